"""The dbward command line."""
