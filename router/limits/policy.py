"""Which limits apply to a request: the key's, its user's, and per-user model-group limits.

A key's own limits override models.yaml's `limits.key`; a user's (`cborg users update`, stored
with the user) override `limits.user`. Checks are cached per key version: a change to a user's
limits marks the user's keys changed (store.update_user), so new checks follow."""
from __future__ import annotations

from dataclasses import dataclass

from common.bounded import BoundedDict

from ..catalog import LimitsConf, LimitSet, Route
from ..store.base import KeyRecord, UserRecord
from ..durations import parse_duration


@dataclass(frozen=True, slots=True)
class Check:
    """One scope's limits for one request. `scope` names the counters (shared across replicas)."""

    scope: str                    # "k:<key id>", "u:<user id>", "m:<user id>|<pattern>"
    label: str                    # for messages: "key key-ab12", "user ada@lbl.gov", ...
    kind: str                     # key | user | model
    parallel: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget: float | None = None   # set only for commercial routes
    period_s: float | None = None

    @property
    def empty(self) -> bool:
        return self.parallel is None and self.rpm is None and self.tpm is None and self.budget is None


def _pick(own, default):
    return own if own is not None else default


class Policy:
    """Turns (key, route) into Checks; cached per key version and route."""

    def __init__(self, conf: LimitsConf, users: dict[str, UserRecord] | None = None):
        self.conf = conf
        self.users = users if users is not None else {}    # user id -> record with limits set (the key cache's)
        self._cache: dict[tuple, tuple[Check, ...]] = BoundedDict(50_000)
        self._groups: dict[str, list[tuple[str, LimitSet]]] = {}
        self._periods: dict[tuple, tuple] = BoundedDict(50_000)

    def _model_groups(self, route: Route) -> list[tuple[str, LimitSet]]:
        g = self._groups.get(route.name)
        if g is None:
            g = []
            for pattern, ls in self.conf.models.items():
                for n in (route.name, route.model.name):
                    if n == pattern or (pattern.endswith("/*") and n.startswith(pattern[:-1])) or pattern == "*":
                        g.append((pattern, ls))
                        break
            self._groups[route.name] = g
        return g

    def checks(self, key: KeyRecord, route: Route) -> tuple[Check, ...]:
        ck = (key.id, key.updated_at, route.name)
        got = self._cache.get(ck)
        if got is not None:
            return got
        c = self.conf
        commercial = route.commercial
        kd = c.key
        key_budget = _pick(key.max_budget, kd.budget)
        out = [
            Check(f"k:{key.id}", f"key {key.alias or key.id}", "key",
                  _pick(key.max_parallel, kd.parallel), _pick(key.rpm, kd.rpm), _pick(key.tpm, kd.tpm),
                  key_budget if commercial else None,
                  parse_duration(_pick(key.budget_period, kd.budget_period))),
            self.user_check(key.user_id, commercial),
        ]
        for pattern, ls in self._model_groups(route):
            out.append(Check(f"m:{key.user_id}|{pattern}", f"user {key.user_id} on {pattern}", "model",
                             ls.parallel, ls.rpm, ls.tpm, None, None))
        checks = tuple(x for x in out if not x.empty)
        self._cache[ck] = checks
        return checks

    def user_check(self, user_id: str, commercial: bool = True, user: UserRecord | None = None) -> Check:
        """The user scope's limits: the user's own where set, else models.yaml's limits.user.
        `user`: the user's record where the caller has one fresher than the key cache's."""
        ud = self.conf.user
        u = user if user is not None else self.users.get(user_id)
        if u is None:
            return Check(f"u:{user_id}", f"user {user_id}", "user", ud.parallel, ud.rpm, ud.tpm,
                         ud.budget if commercial else None, ud.period_s)
        return Check(f"u:{user_id}", f"user {user_id}", "user", _pick(u.max_parallel, ud.parallel),
                     _pick(u.rpm, ud.rpm), _pick(u.tpm, ud.tpm),
                     _pick(u.max_budget, ud.budget) if commercial else None,
                     parse_duration(_pick(u.budget_period, ud.budget_period)))

    def periods(self, key: KeyRecord) -> tuple[float | None, float | None]:
        """Budget periods (s) of a key and of its user, for the ledger's spend roll-over."""
        ck = (key.id, key.updated_at)
        got = self._periods.get(ck)
        if got is None:
            got = self._periods[ck] = (parse_duration(_pick(key.budget_period, self.conf.key.budget_period)),
                                       self.user_check(key.user_id).period_s)
        return got

    def budget_scopes(self, key: KeyRecord) -> list[Check]:
        """The budget-carrying scopes of a key, whatever the route (for spend accounting)."""
        kd = self.conf.key
        return [Check(f"k:{key.id}", "", "key", budget=_pick(key.max_budget, kd.budget),
                      period_s=parse_duration(_pick(key.budget_period, kd.budget_period))),
                self.user_check(key.user_id)]
