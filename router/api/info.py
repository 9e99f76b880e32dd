"""What a caller may learn about models and about their own key (LiteLLM/CBorg shapes)."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import orjson

from common.asgi import App, HTTPError, Request, json_response

from ..auth import allowed, hash_key
from ..catalog import Route
from ..accounting.cost import cost_of, estimate_tokens
from ..key_admin import find_key
from ..limits.budget import roll
from ..limits.policy import Policy
from ..providers.base import normalize_usage
from ..store.base import USER_LIMIT_FIELDS, KeyRecord

if TYPE_CHECKING:
    from ..app import Gateway


def model_info(route: Route) -> dict:
    m = route.model
    p = m.price
    return {
        "model_name": route.name,
        "litellm_params": {"model": m.model},
        "model_info": {
            "id": route.name,
            "provider": route.provider_name,
            "mode": m.mode,
            "max_input_tokens": m.max_input_tokens,
            "max_output_tokens": m.max_output_tokens,
            "max_tokens": m.max_output_tokens,
            "input_cost_per_token": p.input / 1e6,
            "output_cost_per_token": p.output / 1e6,
            "cache_read_input_token_cost": (p.cached_input if p.cached_input is not None else p.input) / 1e6,
            "cache_creation_input_token_cost": (p.cache_write if p.cache_write is not None else p.input) / 1e6,
            "supports_vision": m.supports_vision,
            "supports_function_calling": m.supports_function_calling,
            "supports_prompt_caching": m.supports_prompt_caching,
            "supports_system_messages": m.supports_system_messages,
            "supports_reasoning": m.supports_reasoning,
            "commercial": route.commercial,
            "alias_of": m.name if route.is_alias else None,
            "description": m.description,
        },
    }


def iso(ts: float | None) -> str | None:
    """Times as LiteLLM's API gives them: ISO 8601, UTC."""
    return None if ts is None else \
        datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def key_info(k: KeyRecord, policy: Policy, live_spend: float | None = None) -> dict:
    """LiteLLM's /key/info `info` object, plus CBorg's names. Limits and budget are the ones that
    apply (the key's own, else the configured defaults); spend is as of now's budget period."""
    d = policy.conf.key
    budget = policy.budget_scopes(k)[0]
    spend, reset_at = roll(k.spend, k.budget_reset_at, budget.period_s, time.time()) \
        if k.budget_reset_at is not None else (k.spend, None)   # a period starts with the first spend
    return {
        "key_id": k.id,
        "key_name": k.key_hint,
        "key_alias": k.alias,
        "user_id": k.user_id,
        "models": k.models,
        "created_at": iso(k.created_at),
        "expires": iso(k.expires_at),
        "blocked": k.blocked,
        "revoked": k.revoked_at is not None,
        "spend": live_spend if live_spend is not None else spend,
        "max_budget": budget.budget,
        "budget_duration": k.budget_period or d.budget_period,
        "budget_reset_at": iso(reset_at),
        "budget_applies_to": "commercial models",
        "max_parallel_requests": k.max_parallel if k.max_parallel is not None else d.parallel,
        "rpm_limit": k.rpm if k.rpm is not None else d.rpm,
        "tpm_limit": k.tpm if k.tpm is not None else d.tpm,
        "metadata": k.metadata,
    }


async def user_info_of(gw: "Gateway", uid: str) -> dict | None:
    """LiteLLM's /user/info body: the user's spend and the limits that apply to them (their own
    where an admin set them, else models.yaml's `limits.user`), and their keys. None: no such user."""
    user = await gw.store.get_user(uid)
    keys = await gw.store.list_keys(uid)
    if user is None and not keys:
        return None
    c = gw.policy.user_check(uid, user=user)      # (the database's: the key cache's within its poll)
    live = gw.limiter.spend_of(f"u:{uid}")
    spend, reset_at = roll(user.spend if user else 0.0, user.budget_reset_at if user else None, c.period_s,
                           time.time())
    conf = gw.policy.conf.user
    own = user if user is not None and user.updated_at else None
    return {"user_id": uid, "user_info": {
        "user_id": uid, "spend": live if live is not None else spend,
        "max_budget": c.budget, "budget_duration": (own and own.budget_period) or conf.budget_period,
        "budget_reset_at": iso(reset_at), "budget_applies_to": "commercial models",
        "max_parallel_requests": c.parallel, "rpm_limit": c.rpm, "tpm_limit": c.tpm,
        "limits_set": {f: getattr(own, f) for f in USER_LIMIT_FIELDS if getattr(own, f) is not None} if own else {}},
        "keys": [key_info(k, gw.policy) for k in keys]}


async def caller_key(gw: "Gateway", req: Request) -> KeyRecord | None:
    """The calling key, or None for the master key."""
    return await gw.keys.caller(gw.settings.master_key, req.headers)


def register(app: App, gw: "Gateway") -> None:
    async def models_info(req: Request):
        key = await caller_key(gw, req)
        want = req.query.get("model")
        routes = gw.catalog.routes.values()
        if want:
            r = gw.catalog.resolve(want)
            routes = [r] if r is not None else []
        data = [model_info(r) for r in routes if key is None or allowed(key, r)]
        return json_response({"data": data})

    async def get_key_info(req: Request):
        key = await caller_key(gw, req)
        ref = req.query.get("key")
        if key is None:  # master key: any key, by secret, id, hash or alias
            if not ref:
                raise HTTPError(400, "With the master key, name the key: /key/info?key=...", param="key")
            rec = await find_key(gw.store, ref)
            if rec is None:
                raise HTTPError(404, "No such key.", code="key_not_found", param="key")
        else:
            rec = key
            if ref and ref not in (key.id, key.key_hash, key.alias) and hash_key(ref) != key.key_hash:
                raise HTTPError(403, "A key may only read its own info.", code="forbidden")
        fresh = await gw.store.find_key(rec.id)   # spend as of the last ledger flush (<= 0.5 s)
        return json_response({"key": rec.id, "info": key_info(fresh or rec, gw.policy,
                                                              gw.limiter.spend_of(f"k:{rec.id}"))})

    async def user_info(req: Request):
        key = await caller_key(gw, req)
        if key is None:
            uid = req.query.get("user_id")
            if not uid:
                raise HTTPError(400, "With the master key, name the user: /user/info?user_id=...", param="user_id")
        else:
            uid = key.user_id
            if req.query.get("user_id") not in (None, uid):
                raise HTTPError(403, "A key may only read its own user's info.", code="forbidden")
        info = await user_info_of(gw, uid)
        if info is None:
            raise HTTPError(404, f"No such user: {uid}.", code="user_not_found", param="user_id")
        return json_response(info)

    async def cost_calculate(req: Request):
        await caller_key(gw, req)
        d = await req.json(gw.settings.max_body_bytes)
        if not isinstance(d, dict):
            raise HTTPError(400, "Request body must be a JSON object.")
        resp = d.get("completion_response") if isinstance(d.get("completion_response"), dict) else None
        name = d.get("model") or (resp or {}).get("model")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "Missing required parameter: 'model'.", param="model")
        route = gw.catalog.resolve(name)
        if route is None:
            raise HTTPError(404, f"The model '{name}' does not exist.", code="model_not_found", param="model")
        estimated = False
        if resp is not None:
            usage = resp.get("usage") or {}
        elif "messages" in d or "prompt" in d or "input" in d:
            text = orjson.dumps(d.get("messages") or d.get("prompt") or d.get("input"))
            usage = {"prompt_tokens": estimate_tokens(text) + estimate_tokens((route.system_prompt or "").encode()),
                     "completion_tokens": d.get("max_tokens") or d.get("completion_tokens") or 0}
            estimated = True
        else:
            usage = {"prompt_tokens": d.get("prompt_tokens") or 0, "completion_tokens": d.get("completion_tokens") or 0,
                     "prompt_tokens_details": {"cached_tokens": d.get("cached_tokens") or 0},
                     "cache_creation_input_tokens": d.get("cache_creation_input_tokens") or 0}
        try:
            usage = normalize_usage(usage)
            if "cache_creation_input_tokens" in d or "cache_creation_input_tokens" in (resp or {}).get("usage", {}):
                usage["cache_creation_input_tokens"] = int(d.get("cache_creation_input_tokens") or
                                                           (resp or {}).get("usage", {}).get("cache_creation_input_tokens") or 0)
        except (TypeError, ValueError):
            raise HTTPError(400, "Token counts must be whole numbers.") from None
        cost = cost_of(route.model.price, usage) if route.commercial else 0.0
        return json_response({"cost": cost, "model": route.name, "underlying_model": route.model.model,
                              "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                              "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "estimated": estimated,
                              "currency": "USD"})

    app.route("/model/info", "GET", models_info)
    app.route("/key/info", "GET", get_key_info)
    app.route("/user/info", "GET", user_info)
    for path in ("/cost/calculate", "/spend/calculate"):
        app.route(path, "POST", cost_calculate)
