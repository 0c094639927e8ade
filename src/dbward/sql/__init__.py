"""SQL statement model and per-dialect classifiers built on the real grammar."""
