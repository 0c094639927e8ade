"""PostgreSQL v3 frontend/backend protocol codec and SCRAM."""
