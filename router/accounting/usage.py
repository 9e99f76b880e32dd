"""Token counts from an upstream, checked before anything is priced, counted or written.

Every call's usage passes through `valid_usage` (pipeline `Call.account`), whichever provider or
engine reported it: counts become non-negative integers no larger than `MAX_TOKENS`, so that one
upstream's `prompt_tokens: 10**19` cannot overflow a ledger column (and stop every later flush),
and a negative count cannot lower a user's spend. A count that had to be changed is logged as a
warning naming the upstream.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger("cborg.usage")

MAX_TOKENS = 100_000_000
"""Tokens one call may report per field: fifty times the longest context window offered today, and far
inside a 64-bit column (cost at the dearest price stays a finite float of a few thousand dollars)."""

_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens", "cache_creation_input_tokens",
           "cache_read_input_tokens")


def _count(v, field: str, upstream: str) -> int:
    if type(v) is int and 0 <= v <= MAX_TOKENS:
        return v
    if v is None:
        return 0
    if type(v) is float and math.isfinite(v):
        n = int(v)
    elif type(v) is int:
        n = v
    else:
        log.warning("usage from %s: %s=%.80r is not a number; counted as 0", upstream, field, v)
        return 0
    out = min(max(n, 0), MAX_TOKENS)
    if out != v:
        log.warning("usage from %s: %s=%.80r is out of range; counted as %d", upstream, field, v, out)
    return out


def valid_usage(usage: dict, upstream: str) -> dict:
    """`usage` (OpenAI's shape) with every count checked, changed in place (the client's copy of a
    response carries the same numbers as the ledger) and returned; `prompt_tokens_details` and
    `completion_tokens_details` always dicts, `cached_tokens` at most `prompt_tokens`."""
    u = usage
    for f in _COUNTS:
        v = u.get(f)
        if type(v) is not int or not 0 <= v <= MAX_TOKENS:
            if f in u:
                u[f] = _count(v, f, upstream)
    p = u.setdefault("prompt_tokens", 0)
    c = u.setdefault("completion_tokens", 0)
    t = u.get("total_tokens")
    if t is None or t < p + c:
        u["total_tokens"] = p + c
    for name in ("prompt_tokens_details", "completion_tokens_details"):
        d = u.get(name)
        if d is None:
            continue
        if type(d) is not dict:
            log.warning("usage from %s: %s=%.80r is not an object; dropped", upstream, name, d)
            u.pop(name)
            continue
        for k, v in d.items():
            if type(v) is not int or not 0 <= v <= MAX_TOKENS:
                d[k] = _count(v, f"{name}.{k}", upstream)
    ptd = u.get("prompt_tokens_details")
    if ptd is None:
        ptd = u["prompt_tokens_details"] = {"cached_tokens": 0}
    cached = ptd.setdefault("cached_tokens", 0)
    if cached > p:
        log.warning("usage from %s: cached_tokens=%d exceeds prompt_tokens=%d; counted as %d", upstream, cached, p, p)
        ptd["cached_tokens"] = p
    return u
