"""Admission control: parallel requests, requests and tokens per minute, budgets.

A limiter's `admit(call)` either raises a 429 HTTPError naming the limit, its value and when it
resets, or returns an Admission whose `finish(call)` (called exactly once, by Call.finish) releases
parallel slots, corrects the token estimate to the actual usage and adds the cost to the spend.
Budgets are reserved: admission holds the call's worst-case cost (`call.reserve`: prompt estimate at
the input price plus its output limit at the output price) until it ends (`over_budget`).
Windows are 60 one-second buckets: "per minute" means any 60-second window, to the second.
Two implementations: memory.py (one process) and redis.py (shared by replicas).
"""
from __future__ import annotations

import math
import time

from common.asgi import HTTPError
from common.bounded import BoundedDict

from .policy import Check

_LIMIT_NAMES = {"parallel": "parallel requests", "rpm": "requests per minute", "tpm": "tokens per minute",
                "budget": "budget"}


def usd(v: float) -> str:
    """Dollars as people read them: $50.00, $0.42, and small budgets with their digits ($0.0002)."""
    return f"${v:,.2f}" if v >= 0.01 or v == 0 else f"${v:.2g}"


def over_budget(spend: float, held: float, worst: float, budget: float) -> bool:
    """Whether a call reserving `worst` (its worst-case cost) is refused, with `held` reserved by the
    scope's calls in progress. A call is admitted while spend and reservations leave room, and its
    whole worst case must fit unless it is the only call in progress: so concurrent calls cannot
    together spend past the budget by more than one call's cost."""
    if spend + held >= budget:
        return True
    return held > 0 and spend + held + worst > budget


def reject(check: Check, limit: str, value: float, used: float, reset_in: float | None,
           need: int = 0, reset_at: float | None = None, held: float = 0.0) -> HTTPError:
    """The 429 for one exceeded limit: which, its value, and when it resets."""
    who = check.label
    if limit == "parallel":
        msg = (f"Too many parallel requests for {who}: the limit is {int(value)} in flight. "
               "Retry when one of your requests has finished.")
        retry = 1
    elif limit == "budget":
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(reset_at)) if reset_at else "never (no budget period)"
        pending = f" (and {usd(held)} held by calls in progress)" if held else ""
        msg = (f"Budget exceeded for {who}: spent {usd(used)}{pending} of the {usd(value)} budget for commercial "
               f"models; it resets {('at ' + when) if reset_at else when}. Free lbl/* models remain available.")
        retry = max(1, math.ceil(reset_in)) if reset_in is not None else 3600
    else:
        extra = f", this request needs about {need}" if limit == "tpm" and need else ""
        msg = (f"Rate limit reached for {who}: {int(value)} {_LIMIT_NAMES[limit]} (used {int(used)}{extra}). "
               f"Resets in {max(1, math.ceil(reset_in or 1))} s.")
        retry = max(1, math.ceil(reset_in or 1))
    headers = [(b"retry-after", str(retry).encode())]
    if limit == "budget":
        headers.append((b"x-should-retry", b"false"))   # days away: the SDK's quick retries cannot help
    err = HTTPError(429, msg, code="rate_limit_exceeded", type="rate_limit_error", headers=headers)
    err.limit = limit  # type: ignore[attr-defined]
    err.scope_kind = check.kind  # type: ignore[attr-defined]
    return err


_RESET_REQ = (b"x-ratelimit-reset-requests", b"1m0s")
_RESET_TOK = (b"x-ratelimit-reset-tokens", b"1m0s")
_LIMIT_HEADERS: dict[tuple[bytes, int], tuple[bytes, bytes]] = BoundedDict(10_000)


def limit_header(name: bytes, value: int) -> tuple[bytes, bytes]:
    """An x-ratelimit-limit-* header, made once per value (a limiter holds them per check)."""
    h = _LIMIT_HEADERS.get((name, value))
    if h is None:
        h = _LIMIT_HEADERS[(name, value)] = (name, b"%d" % value)
    return h


def ratelimit_headers(req: tuple[tuple[bytes, bytes], int] | None,
                      tok: tuple[tuple[bytes, bytes], int] | None) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-* from the tightest (limit header, remaining) of requests and of tokens.

    reset is OpenAI's meaning: the time until the limit is back to its initial state. A request
    just admitted is counted in the current one-second bucket, which leaves the window a minute
    later: on a success it is always the full minute (OpenAI's text: 1m0s). Remaining is never
    negative here (an admission that would make it so is refused)."""
    if req is not None:
        if tok is not None:
            return [req[0], (b"x-ratelimit-remaining-requests", b"%d" % req[1]), _RESET_REQ,
                    tok[0], (b"x-ratelimit-remaining-tokens", b"%d" % tok[1]), _RESET_TOK]
        return [req[0], (b"x-ratelimit-remaining-requests", b"%d" % req[1]), _RESET_REQ]
    if tok is not None:
        return [tok[0], (b"x-ratelimit-remaining-tokens", b"%d" % tok[1]), _RESET_TOK]
    return []


def fit_estimate(est: int | None, checks) -> int | None:
    """The token estimate a request is admitted on, at most the smallest tokens-per-minute limit.

    The estimate is rough (bytes / 4); one above a limit would make the request inadmissible
    forever while its real usage might fit. Capped, it is admitted once the window is empty and
    counted at its real usage after. `est=None`: just the smallest limit (None if none)."""
    for c in checks:
        if c.tpm is not None and (est is None or est > c.tpm):
            est = c.tpm
    return est


def tokens_used(call) -> int:
    u = call.usage
    if not u:
        return 0
    return int(u.get("prompt_tokens") or 0) + int(u.get("completion_tokens") or 0)


class _Open:
    """Admission with no limits: nothing to release, no headers."""

    __slots__ = ()
    headers: list = []

    def finish(self, call) -> None:
        return None


OPEN = _Open()


class NullLimiter:
    """Limits and budgets off (CBORG_LIMITS=off)."""

    async def admit(self, call) -> _Open:
        return OPEN

    def admit_now(self, call) -> _Open:
        return OPEN

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def spend_of(self, scope: str) -> float | None:
        return None
