"""The Key Manager's error: an HTML page with a status and a message (the JSON API has its own)."""
from __future__ import annotations


class PageError(Exception):
    def __init__(self, status: int, message: str, *, signin: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.signin = signin      # offer the sign-in link
