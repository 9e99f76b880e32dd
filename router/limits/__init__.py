"""Admission control: parallel requests, requests and tokens per minute, budgets."""
from __future__ import annotations


class _Open:
    """Admission with no limits: nothing to release, no headers."""

    __slots__ = ()
    headers: list = []

    async def finish(self, call) -> None:
        return None


_OPEN = _Open()


class NullLimiter:
    async def admit(self, call) -> _Open:
        return _OPEN
