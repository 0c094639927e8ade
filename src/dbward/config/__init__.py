"""Typed settings and the YAML loader."""
