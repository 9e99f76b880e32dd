"""What a caller may learn about models and about their own key (LiteLLM/CBorg shapes)."""
from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from cborg.asgi import App, HTTPError, Request, json_response

from ..auth import bearer_token, hash_key
from ..catalog import Route
from ..key_admin import find_key
from ..pipeline import allowed
from ..store.base import KeyRecord

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


def key_info(k: KeyRecord) -> dict:
    """LiteLLM's /key/info `info` object, plus CBorg's names."""
    return {
        "key_id": k.id,
        "key_name": k.key_hint,
        "key_alias": k.alias,
        "user_id": k.user_id,
        "models": k.models,
        "created_at": k.created_at,
        "expires": k.expires_at,
        "blocked": k.blocked,
        "revoked": k.revoked_at is not None,
        "spend": k.spend,
        "max_budget": k.max_budget,
        "budget_duration": k.budget_period,
        "budget_reset_at": k.budget_reset_at,
        "max_parallel_requests": k.max_parallel,
        "rpm_limit": k.rpm,
        "tpm_limit": k.tpm,
        "metadata": k.metadata,
    }


def is_master(gw: "Gateway", req: Request) -> bool:
    mk = gw.settings.master_key
    tok = bearer_token(req.headers)
    return bool(mk and tok and hmac.compare_digest(mk.encode(), tok.encode()))


async def caller_key(gw: "Gateway", req: Request) -> KeyRecord | None:
    """The calling key, or None for the master key."""
    if is_master(gw, req):
        return None
    return await gw.keys.verify(bearer_token(req.headers))


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
        return json_response({"key": rec.id, "info": key_info(rec)})

    app.route("/model/info", "GET", models_info)
    app.route("/key/info", "GET", get_key_info)
