"""Listeners, TLS and upstream connections: the only code that touches sockets."""
