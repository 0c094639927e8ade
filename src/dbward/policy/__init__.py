"""The single policy decision point."""
