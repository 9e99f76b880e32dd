"""In-process limiter: exact for one gateway process (the embedded default).

Check-then-apply runs without an await in between, so on one event loop it is atomic. Spend per
key and per user starts from the database the first time this process sees the scope and then
follows every request it serves; the ledger writes the same costs to the database.
"""
from __future__ import annotations

import collections
import time
from typing import Callable

from . import fit_estimate, ratelimit_headers, reject, tokens_used
from .budget import roll
from .policy import Check, Policy


class Window:
    """Counts in one-second buckets over the last 60 seconds."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: collections.deque[list] = collections.deque()
        self.total = 0

    def expire(self, sec: int) -> None:
        b = self.buckets
        while b and b[0][0] <= sec - 60:
            self.total -= b.popleft()[1]

    def add(self, sec: int, n: int) -> None:
        b = self.buckets
        if b and b[-1][0] == sec:
            b[-1][1] += n
        else:
            b.append([sec, n])
        self.total += n

    def adjust(self, sec: int, delta: int) -> None:
        """Change the count of second `sec`, if it is still in the window."""
        for entry in reversed(self.buckets):
            if entry[0] == sec:
                entry[1] += delta
                self.total += delta
                return
            if entry[0] < sec:
                return

    def settle(self, sec: int, est: int, now: int, used: int) -> None:
        """A request's estimate (counted at admission, second `sec`) replaced by the tokens it used,
        counted at the second it ended: a request longer than the window still counts in full."""
        if est:
            self.adjust(sec, -est)
        if used:
            b = self.buckets
            self.add(max(now, b[-1][0]) if b else now, used)

    def reset_in(self, now: float, need: int, limit: int) -> float:
        """Seconds until `need` more fits under `limit`."""
        over = self.total + need - limit
        freed = 0
        for sec, n in self.buckets:
            freed += n
            if freed >= over:
                return max(0.0, sec + 60 - now)
        return 60.0


class MemAdmission:
    __slots__ = ("lim", "checks", "sec", "est", "headers", "scopes")

    def __init__(self, lim: "MemoryLimiter", checks: tuple[Check, ...], sec: int, est: int, headers: list,
                 scopes: tuple[str, str]):
        self.lim = lim
        self.checks = checks
        self.sec = sec
        self.est = est
        self.headers = headers
        self.scopes = scopes

    def finish(self, call) -> None:
        self.lim._finish(self, call)


class MemoryLimiter:
    def __init__(self, policy: Policy, store, clock: Callable[[], float] = time.time):
        self.policy = policy
        self.store = store
        self.clock = clock
        self.inflight: dict[str, int] = collections.defaultdict(int)
        self.req: dict[str, Window] = collections.defaultdict(Window)
        self.tok: dict[str, Window] = collections.defaultdict(Window)
        self.spend: dict[str, list] = {}         # scope -> [spend, reset_at, period_s]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def _load(self, key) -> None:
        """Spend of a key and its user as the database has it, the first time we meet them."""
        ks, us = f"k:{key.id}", f"u:{key.user_id}"
        kb, ub = self.policy.budget_scopes(key)
        now = self.clock()
        if ks not in self.spend:
            self.spend[ks] = [*roll(key.spend, key.budget_reset_at, kb.period_s, now), kb.period_s]
        if us not in self.spend:
            u = await self.store.get_user(key.user_id)
            if us not in self.spend:
                self.spend[us] = [*roll(u.spend if u else 0.0, u.budget_reset_at if u else None, ub.period_s, now),
                                  ub.period_s]

    def spend_of(self, scope: str) -> float | None:
        s = self.spend.get(scope)
        if s is None:
            return None
        return roll(s[0], s[1], s[2], self.clock())[0]

    async def admit(self, call):
        key = call.key
        ks = f"k:{key.id}"
        if ks not in self.spend or f"u:{key.user_id}" not in self.spend:
            await self._load(key)
        checks = self.policy.checks(key, call.route)
        now = self.clock()
        sec = int(now)
        est = fit_estimate(call.prompt_estimate, checks)
        req_h = tok_h = None
        for c in checks:
            if c.parallel is not None and self.inflight[c.scope] >= c.parallel:
                raise reject(c, "parallel", c.parallel, self.inflight[c.scope], None)
            if c.rpm is not None:
                w = self.req[c.scope]
                w.expire(sec)
                if w.total + 1 > c.rpm:
                    raise reject(c, "rpm", c.rpm, w.total, w.reset_in(now, 1, c.rpm))
                rem = c.rpm - w.total - 1
                if req_h is None or rem < req_h[1]:
                    req_h = (c.rpm, rem, sec + 60 - now)
            if c.tpm is not None:
                w = self.tok[c.scope]
                w.expire(sec)
                if w.total + est > c.tpm:
                    raise reject(c, "tpm", c.tpm, w.total, w.reset_in(now, est, c.tpm), need=est)
                rem = c.tpm - w.total - est
                if tok_h is None or rem < tok_h[1]:
                    tok_h = (c.tpm, rem, sec + 60 - now)
            if c.budget is not None:
                s = self.spend.get(c.scope)
                spent, reset_at = roll(s[0], s[1], c.period_s, now) if s else (0.0, None)
                if spent >= c.budget:
                    raise reject(c, "budget", c.budget, spent, (reset_at - now) if reset_at else None,
                                 reset_at=reset_at)
        for c in checks:
            if c.parallel is not None:
                self.inflight[c.scope] += 1
            if c.rpm is not None:
                self.req[c.scope].add(sec, 1)
            if c.tpm is not None:
                self.tok[c.scope].add(sec, est)
        headers = ratelimit_headers(req_h, tok_h) if (req_h or tok_h) else []
        return MemAdmission(self, checks, sec, est, headers, (ks, f"u:{key.user_id}"))

    def _finish(self, adm: MemAdmission, call) -> None:
        used = tokens_used(call)
        now = self.clock()
        for c in adm.checks:
            if c.parallel is not None:
                self.inflight[c.scope] -= 1
            if c.tpm is not None and used != adm.est:
                self.tok[c.scope].settle(adm.sec, adm.est, int(now), used)
        cost = call.cost
        if cost:
            for scope in adm.scopes:
                s = self.spend.get(scope)
                if s is not None:
                    s[0], s[1] = roll(s[0], s[1], s[2], now)
                    s[0] += cost
