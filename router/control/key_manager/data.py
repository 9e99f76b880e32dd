"""What the Key Manager's pages show, read from the stores and the catalog: a user's keys, budget
and 30-day spend (the daily aggregate, never the ledger), and the models they may use."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ... import auth
from ...limits.budget import roll
from ...store.base import USER_LIMIT_FIELDS, KeyRecord, UserSummary
from ..views import iso, key_info, user_info_of
from . import chart
from .render import money

if TYPE_CHECKING:
    from ...app import Gateway


def self_service_spec(gw: "Gateway", user_id: str) -> KeyRecord:
    """A stand-in key with the lab's self-service model list: which routes such keys may use is
    router/auth.py's `allowed`, as for any key."""
    return KeyRecord(id="", key_hash="", key_hint="", user_id=user_id, models=gw.catalog.self_service_models)


def models_for(gw: "Gateway", user_id: str) -> list[dict]:
    """The public models a self-service key may use, with prices, and each local model's state."""
    spec = self_service_spec(gw, user_id)
    states = gw.nodes.view()["models"]
    out = []
    for name, r in gw.catalog.routes.items():
        if not auth.allowed(spec, r):
            continue
        p = r.model.price
        st = states.get(r.model.name, {}).get("state") if r.provider.local and not r.model.base_url else None
        out.append({"name": name, "description": r.model.description or (f"an alias of {r.model.name}"
                                                                          if r.is_alias else ""),
                    "mode": r.model.mode, "free": not r.commercial, "input": p.input, "output": p.output,
                    "state": st})
    return sorted(out, key=lambda m: (not m["free"], m["name"]))


def _default_user(gw: "Gateway", uid: str) -> dict:
    """The /user/info body of someone with no record and no key yet: the lab's defaults."""
    c = gw.policy.user_check(uid, user=None)
    conf = gw.policy.conf.user
    return {"user_id": uid, "spend": 0.0, "max_budget": c.budget, "budget_duration": conf.budget_period,
            "budget_reset_at": None, "max_parallel_requests": c.parallel, "rpm_limit": c.rpm, "tpm_limit": c.tpm,
            "limits_set": {}}


async def user_view(gw: "Gateway", uid: str) -> dict:
    """A user's page: budget and spend this period (live), keys (spend this period, and the last 30
    days from the aggregate), the 30-day chart by model, the models they may use."""
    info = await user_info_of(gw, uid) or {"user_info": _default_user(gw, uid), "keys": []}
    last = chart.today()
    days = await gw.store.daily_spend(uid, last - chart.DAYS + 1)
    per_key: dict[str, float] = {}
    for d in days:
        per_key[d.key_id] = per_key.get(d.key_id, 0.0) + d.cost
    now = iso(time.time())
    keys = [{**k, "spend_30d": per_key.get(k["key_id"], 0.0), "status": status(k, now)} for k in info["keys"]]
    keys.sort(key=lambda k: k["created_at"] or "", reverse=True)
    u = info["user_info"]
    budget = u["max_budget"]
    return {"user_id": uid, "user": u, "keys": [k for k in keys if not k["revoked"]],
            "revoked": [k for k in keys if k["revoked"]],
            "used_pct": min(100.0, 100.0 * u["spend"] / budget) if budget else None,
            "chart": chart.build(days, last, money), "models": models_for(gw, uid)}


def status(k: dict, now_iso: str) -> str:
    """A key's state in a word (k: a key_info dict), as the key check would decide it now."""
    if k["revoked"]:
        return "revoked"
    if k["blocked"]:
        return "blocked"
    if k["expires"] is not None and k["expires"] <= now_iso:
        return "expired"
    return "active"


def key_rows(gw: "Gateway", keys: list[KeyRecord]) -> list[dict]:
    now = iso(time.time())
    out = []
    for k in keys:
        info = key_info(k, gw.policy)
        out.append({**info, "status": status(info, now)})
    return out


async def user_rows(gw: "Gateway", summaries: list[UserSummary]) -> list[dict]:
    """The admin's user list: each user's spend this period (live where this replica has it), the
    last 30 days' (the aggregate), their limits as they apply, and which are their own."""
    since = chart.today() - chart.DAYS + 1
    month = await gw.store.users_spend_since([s.user_id for s in summaries], since)
    now = time.time()
    out = []
    for s in summaries:
        u = s.user
        c = gw.policy.user_check(s.user_id, user=u)
        spend = roll(u.spend, u.budget_reset_at, c.period_s, now)[0] if u is not None else 0.0
        live = gw.limiter.spend_of(f"u:{s.user_id}")
        own = u if u is not None and u.updated_at else None
        out.append({"user_id": s.user_id, "key_count": s.keys, "active_keys": s.active_keys,
                    "spend": live if live is not None else spend, "spend_30d": month.get(s.user_id, 0.0),
                    "max_budget": c.budget, "period": (own and own.budget_period) or gw.policy.conf.user.budget_period,
                    "parallel": c.parallel, "rpm": c.rpm, "tpm": c.tpm,
                    "own": sorted(f for f in USER_LIMIT_FIELDS if own is not None and getattr(own, f) is not None)})
    return out
