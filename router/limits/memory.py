"""In-process limiter: exact for one gateway process (the embedded default).

Check-then-apply runs without an await in between, so on one event loop it is atomic. Spend per
key and per user starts from the database the first time this process sees the scope and then
follows every request it serves; the ledger writes the same costs to the database.
"""
from __future__ import annotations

import collections
import time
from typing import Callable

from . import fit_estimate, ratelimit_headers, reject
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
        b = self.buckets
        if now == sec and b and b[-1][0] == sec:   # ended in the second it was admitted: the usual case
            b[-1][1] += used - est
            self.total += used - est
            return
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


class _Scope:
    """One scope's counters: requests in flight, the request and token windows, and its spend
    ([spend, reset_at, period_s]; None until loaded from the database)."""

    __slots__ = ("inflight", "req", "tok", "spend")

    def __init__(self) -> None:
        self.inflight = 0
        self.req = Window()
        self.tok = Window()
        self.spend: list | None = None


class _Plan:
    """What admitting one (key, route) touches, resolved once per checks tuple: for each kind of
    limit, the checks that set one with their scope's counters; and the key's and user's scopes
    (spend is counted on both, budget or not)."""

    __slots__ = ("checks", "parallel", "rpm", "tpm", "budget", "tpm_cap", "key_scope", "user_scope")

    def __init__(self, checks: tuple[Check, ...], scope: Callable[[str], _Scope], key_scope: _Scope,
                 user_scope: _Scope):
        self.checks = checks
        self.parallel = tuple((c, scope(c.scope)) for c in checks if c.parallel is not None)
        self.rpm = tuple((c, scope(c.scope).req) for c in checks if c.rpm is not None)
        self.tpm = tuple((c, scope(c.scope).tok) for c in checks if c.tpm is not None)
        self.budget = tuple((c, scope(c.scope)) for c in checks if c.budget is not None)
        self.tpm_cap = fit_estimate(None, checks)
        self.key_scope = key_scope
        self.user_scope = user_scope


class MemAdmission:
    __slots__ = ("lim", "plan", "sec", "est", "headers")

    def __init__(self, lim: "MemoryLimiter", plan: _Plan, sec: int, est: int, headers: list):
        self.lim = lim
        self.plan = plan
        self.sec = sec
        self.est = est
        self.headers = headers

    def finish(self, call) -> None:
        """Slots released, the token estimate replaced by the usage, the cost added to the spend."""
        plan = self.plan
        for _, st in plan.parallel:
            st.inflight -= 1
        cost = call.cost
        if plan.tpm or cost:
            now = self.lim.clock()
            if plan.tpm:
                u = call.usage
                used = (u.get("prompt_tokens") or 0) + (u.get("completion_tokens") or 0) if u else 0
                if used != self.est:
                    for _, w in plan.tpm:
                        w.settle(self.sec, self.est, int(now), used)
            if cost:
                for st in (plan.key_scope, plan.user_scope):
                    s = st.spend
                    if s is not None:
                        if s[1] is None or now >= s[1]:    # no period started, or it ended
                            s[0], s[1] = roll(s[0], s[1], s[2], now)
                        s[0] += cost


class MemoryLimiter:
    def __init__(self, policy: Policy, store, clock: Callable[[], float] = time.time):
        self.policy = policy
        self.store = store
        self.clock = clock
        self.scopes: dict[str, _Scope] = {}
        self._plans: dict[int, _Plan] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _scope(self, name: str) -> _Scope:
        s = self.scopes.get(name)
        if s is None:
            s = self.scopes[name] = _Scope()
        return s

    def _plan(self, key, checks: tuple[Check, ...]) -> _Plan:
        # By identity: Policy hands out the same tuple for a (key version, route), and hashing a
        # tuple of dataclasses would cost more than the rest of an admission.
        p = self._plans.get(id(checks))
        if p is None or p.checks is not checks:
            if len(self._plans) > 50_000:
                self._plans.clear()
            p = self._plans[id(checks)] = _Plan(checks, self._scope, self._scope(f"k:{key.id}"),
                                                self._scope(f"u:{key.user_id}"))
        return p

    async def _load(self, key, plan: _Plan) -> None:
        """Spend of a key and its user as the database has it, the first time we meet them."""
        kb, ub = self.policy.budget_scopes(key)
        now = self.clock()
        if plan.key_scope.spend is None:
            plan.key_scope.spend = [*roll(key.spend, key.budget_reset_at, kb.period_s, now), kb.period_s]
        if plan.user_scope.spend is None:
            u = await self.store.get_user(key.user_id)
            if plan.user_scope.spend is None:
                plan.user_scope.spend = [*roll(u.spend if u else 0.0, u.budget_reset_at if u else None,
                                               ub.period_s, now), ub.period_s]

    def spend_of(self, scope: str) -> float | None:
        st = self.scopes.get(scope)
        s = st.spend if st is not None else None
        if s is None:
            return None
        return roll(s[0], s[1], s[2], self.clock())[0]

    async def admit(self, call):
        adm = self.admit_now(call)
        if adm is None:
            key = call.key
            await self._load(key, self._plan(key, self.policy.checks(key, call.route)))
            adm = self.admit_now(call)
        return adm

    def admit_now(self, call):
        """admit() without an await, for the scopes whose spend is loaded (every request but a
        scope's first): None where it is not. Raises the 429 as admit() does."""
        key = call.key
        checks = self.policy.checks(key, call.route)
        plan = self._plan(key, checks)
        if plan.key_scope.spend is None or plan.user_scope.spend is None:
            return None
        now = self.clock()
        sec = int(now)
        est = call.prompt_estimate
        if plan.tpm_cap is not None and est > plan.tpm_cap:
            est = plan.tpm_cap
        for c, st in plan.parallel:
            if st.inflight >= c.parallel:
                raise reject(c, "parallel", c.parallel, st.inflight, None)
        req_h = tok_h = None
        old = sec - 60
        for c, w in plan.rpm:
            if w.buckets and w.buckets[0][0] <= old:   # (the call only when a second has gone out)
                w.expire(sec)
            rem = c.rpm - w.total - 1
            if rem < 0:
                raise reject(c, "rpm", c.rpm, w.total, w.reset_in(now, 1, c.rpm))
            if req_h is None or rem < req_h[1]:
                req_h = (c.rpm, rem)
        for c, w in plan.tpm:
            if w.buckets and w.buckets[0][0] <= old:
                w.expire(sec)
            rem = c.tpm - w.total - est
            if rem < 0:
                raise reject(c, "tpm", c.tpm, w.total, w.reset_in(now, est, c.tpm), need=est)
            if tok_h is None or rem < tok_h[1]:
                tok_h = (c.tpm, rem)
        for c, st in plan.budget:
            s = st.spend
            if s is None:
                spent, reset_at = 0.0, None
            else:
                if s[2] != c.period_s:
                    s[2] = c.period_s        # the key's budget period was changed
                spent, reset_at = (s[0], s[1]) if s[1] is not None and now < s[1] else roll(s[0], s[1], s[2], now)
            if spent >= c.budget:
                raise reject(c, "budget", c.budget, spent, (reset_at - now) if reset_at else None,
                             reset_at=reset_at)
        for _, st in plan.parallel:
            st.inflight += 1
        # Window.add inlined for the usual case (this second's bucket exists): a call per window
        # was a tenth of an admission.
        for _, w in plan.rpm:
            b = w.buckets
            if b and b[-1][0] == sec:
                b[-1][1] += 1
                w.total += 1
            else:
                w.add(sec, 1)
        for _, w in plan.tpm:
            b = w.buckets
            if b and b[-1][0] == sec:
                b[-1][1] += est
                w.total += est
            else:
                w.add(sec, est)
        headers = ratelimit_headers(req_h, tok_h) if (req_h or tok_h) else []
        return MemAdmission(self, plan, sec, est, headers)
