"""The self-contained demo: embedded PostgreSQL, sample data, local users."""
