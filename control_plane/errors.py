"""Typed errors the API turns into HTTP answers."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class for errors with a client-facing meaning."""


class NotFound(GatewayError):
    pass


class Conflict(GatewayError):
    pass


class InvalidInput(GatewayError):
    """Input that failed validation; ``errors`` lists {field, message} pairs."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


class ReloadFailed(GatewayError):
    """nginx rejected a candidate configuration or could not be signalled."""
