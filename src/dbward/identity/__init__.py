"""Authenticators that turn client credentials into an Identity."""
