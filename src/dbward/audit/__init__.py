"""Append-only audit log: records, sinks and queries."""
