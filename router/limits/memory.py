"""In-process limiter: exact for one gateway process (the embedded default).

Check-then-apply runs without an await in between, so on one event loop it is atomic. Spend per
key and per user starts from the database the first time this process sees the scope and then
follows every request it serves; the ledger writes the same costs to the database.

This is on every request's path: a (key, route)'s limits are resolved once into a `_Plan` of flat
tuples, and a window does its expiry only when the second changes.
"""
from __future__ import annotations

import collections
import time
from typing import Callable

from common.bounded import BoundedDict

from . import fit_estimate, limit_header, over_budget, ratelimit_headers, reject
from .budget import roll
from .policy import Check, Policy

class Window:
    """Counts in one-second buckets over the last 60 seconds: the current second's count (`cur`,
    second `sec`) and the earlier seconds' ([second, count] in `past`); `total` is all of them."""

    __slots__ = ("sec", "cur", "past", "total")

    def __init__(self) -> None:
        self.sec = 0
        self.cur = 0
        self.past: collections.deque[list] = collections.deque()
        self.total = 0

    def roll(self, sec: int) -> None:
        """Second `sec` begins: the current count joins the past, and seconds out of the window go."""
        if self.cur:
            self.past.append([self.sec, self.cur])
            self.cur = 0
        self.sec = sec
        p = self.past
        while p and p[0][0] <= sec - 60:
            self.total -= p.popleft()[1]

    def add(self, sec: int, n: int) -> None:
        if sec != self.sec:
            self.roll(sec)
        self.cur += n
        self.total += n

    def adjust(self, sec: int, delta: int) -> None:
        """Change the count of second `sec`, if it is still in the window."""
        if sec == self.sec:
            self.cur += delta
            self.total += delta
            return
        for entry in reversed(self.past):
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
            self.add(max(now, self.sec), used)

    def reset_in(self, now: float, need: int, limit: int) -> float:
        """Seconds until `need` more fits under `limit`."""
        over = self.total + need - limit
        freed = 0
        for sec, n in (*self.past, (self.sec, self.cur)):
            freed += n
            if freed >= over:
                return max(0.0, sec + 60 - now)
        return 60.0


class _Scope:
    """One scope's counters: requests in flight, the request and token windows, its spend
    ([spend, reset_at, period_s]; None until loaded from the database), and the worst-case cost
    reserved by its calls in progress (`held`, by `holds` calls)."""

    __slots__ = ("inflight", "req", "tok", "spend", "held", "holds")

    def __init__(self) -> None:
        self.inflight = 0
        self.req = Window()
        self.tok = Window()
        self.spend: list | None = None
        self.held = 0.0
        self.holds = 0


class _Plan:
    """What admitting one (key version, route) touches: for each kind of limit, (check, limit,
    counter) for the checks that set one, with the x-ratelimit-limit-* header of each rate; the
    key's and user's scopes (spend is counted on both, budget or not). `ready` once both spends
    are loaded; then `spends` holds them."""

    __slots__ = ("key", "route", "version", "parallel", "inflight", "rpm", "tpm", "tok_windows",
                 "budget", "tpm_cap", "key_scope", "user_scope", "ready", "spends", "clock")

    def __init__(self, key, route, checks: tuple[Check, ...], scope: Callable[[str], _Scope], clock):
        self.key, self.route, self.version = key, route, key.updated_at   # (held: their ids stay theirs)
        self.parallel = tuple((c, c.parallel, scope(c.scope)) for c in checks if c.parallel is not None)
        self.inflight = tuple(st for _, _, st in self.parallel)
        self.rpm = tuple((c, c.rpm, scope(c.scope).req, limit_header(b"x-ratelimit-limit-requests", c.rpm))
                         for c in checks if c.rpm is not None)
        self.tpm = tuple((c, c.tpm, scope(c.scope).tok, limit_header(b"x-ratelimit-limit-tokens", c.tpm))
                         for c in checks if c.tpm is not None)
        self.tok_windows = tuple(w for _, _, w, _ in self.tpm)
        self.budget = tuple((c, c.budget, scope(c.scope)) for c in checks if c.budget is not None)
        self.tpm_cap = fit_estimate(None, checks)
        self.key_scope = scope(f"k:{key.id}")
        self.user_scope = scope(f"u:{key.user_id}")
        self.ready = False
        self.spends: tuple[list, ...] = ()
        self.clock = clock

    def loaded(self) -> bool:
        """Both spends known: from now on no admission of this plan waits for the database."""
        k, u = self.key_scope.spend, self.user_scope.spend
        if k is None or u is None:
            return False
        for c, _, st in self.budget:
            if st.spend is not None and st.spend[2] != c.period_s:
                st.spend[2] = c.period_s        # the key's budget period was changed
        self.spends = (k, u)
        self.ready = True
        return True


class MemAdmission:
    __slots__ = ("plan", "sec", "est", "headers", "held")

    def __init__(self, plan: _Plan, sec: int, est: int, headers: list, held: float):
        self.plan = plan
        self.sec = sec
        self.est = est
        self.headers = headers
        self.held = held

    def finish(self, call) -> None:
        """Slots released, the token estimate replaced by the usage, the reservation by the cost."""
        plan = self.plan
        for st in plan.inflight:
            st.inflight -= 1
        if self.held:
            for _, _, st in plan.budget:
                st.holds -= 1
                st.held = st.held - self.held if st.holds else 0.0   # (no float residue once none is held)
        cost = call.cost
        tok = plan.tok_windows
        if tok or cost:
            now = plan.clock()
            if tok:
                u = call.usage
                d = ((u.get("prompt_tokens") or 0) + (u.get("completion_tokens") or 0) if u else 0) - self.est
                if d:
                    sec = int(now)
                    for w in tok:
                        if w.sec == sec == self.sec:    # ended in the second it was admitted: the usual case
                            w.cur += d
                            w.total += d
                        else:
                            w.settle(self.sec, self.est, sec, self.est + d)
            if cost:
                for s in plan.spends:
                    if s[1] is None or now >= s[1]:    # no period started, or it ended
                        s[0], s[1] = roll(s[0], s[1], s[2], now)
                    s[0] += cost


class MemoryLimiter:
    def __init__(self, policy: Policy, store, clock: Callable[[], float] = time.time):
        self.policy = policy
        self.store = store
        self.clock = clock
        self.scopes: dict[str, _Scope] = {}
        self._plans: dict[tuple[int, int], _Plan] = BoundedDict(50_000)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _scope(self, name: str) -> _Scope:
        s = self.scopes.get(name)
        if s is None:
            s = self.scopes[name] = _Scope()
        return s

    def _plan(self, key, route) -> _Plan:
        # By identity: a key record is replaced, not changed, when the key is (the key cache), and a
        # plan holds its key and route, so a hit on their ids is that key and route.
        p = self._plans.get((id(key), id(route)))
        if p is None or p.version != key.updated_at:
            p = self._plans[(id(key), id(route))] = _Plan(key, route, self.policy.checks(key, route),
                                                          self._scope, self.clock)
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
            await self._load(call.key, self._plan(call.key, call.route))
            adm = self.admit_now(call)
        return adm

    def admit_now(self, call):
        """admit() without an await, for the scopes whose spend is loaded (every request but a
        scope's first): None where it is not. Raises the 429 as admit() does."""
        plan = self._plan(call.key, call.route)
        if not plan.ready and not plan.loaded():
            return None
        now = self.clock()
        sec = int(now)
        est = call.prompt_estimate
        cap = plan.tpm_cap
        if cap is not None and est > cap:
            est = cap
        # Check everything, then count: a refused request leaves no trace.
        for c, n, st in plan.parallel:
            if st.inflight >= n:
                raise reject(c, "parallel", n, st.inflight, None)
        req_h = tok_h = None
        for c, n, w, lh in plan.rpm:
            if w.sec != sec:
                w.roll(sec)
            rem = n - w.total - 1
            if rem < 0:
                raise reject(c, "rpm", n, w.total, w.reset_in(now, 1, n))
            if req_h is None or rem < req_h[1]:
                req_h = (lh, rem)
        for c, n, w, lh in plan.tpm:
            if w.sec != sec:
                w.roll(sec)
            rem = n - w.total - est
            if rem < 0:
                raise reject(c, "tpm", n, w.total, w.reset_in(now, est, n), need=est)
            if tok_h is None or rem < tok_h[1]:
                tok_h = (lh, rem)
        worst = call.reserve if plan.budget else 0.0
        for c, n, st in plan.budget:
            s = st.spend
            if s[1] is None or now >= s[1]:
                s[0], s[1] = roll(s[0], s[1], s[2], now)
            if over_budget(s[0], st.held, worst, n):
                raise reject(c, "budget", n, s[0], (s[1] - now) if s[1] else None, reset_at=s[1], held=st.held)
        for st in plan.inflight:
            st.inflight += 1
        for _, _, w, _ in plan.rpm:
            w.cur += 1
            w.total += 1
        if est:
            for w in plan.tok_windows:
                w.cur += est
                w.total += est
        if worst:
            for _, _, st in plan.budget:
                st.held += worst
                st.holds += 1
        return MemAdmission(plan, sec, est, ratelimit_headers(req_h, tok_h), worst)
