"""dbward: an identity-aware, just-in-time access proxy for databases."""

__version__ = "0.1.0"
