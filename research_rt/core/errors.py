"""Errors every layer may raise toward the client."""

from __future__ import annotations


class RequestError(ValueError):
    """A client mistake: becomes a 4xx JSON error (`{"error": {"message": ...}}`)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
