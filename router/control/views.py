"""What the control plane shows of models, keys and users (LiteLLM's shapes, plus CBorg's names),
and pydantic models of those shapes for the OpenAPI document.

The builders return plain dicts (they are sent with orjson, not re-validated per response); the
models document them, and the Schemathesis test checks that responses match the documents.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ..catalog import Route
from ..limits.budget import roll
from ..limits.policy import Policy
from ..store.base import USER_LIMIT_FIELDS, KeyRecord

if TYPE_CHECKING:
    from ..app import Gateway


def iso(ts: float | None) -> str | None:
    """Times as LiteLLM's API gives them: ISO 8601, UTC."""
    return None if ts is None else \
        datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


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


# -- documents of those shapes (OpenAPI) ------------------------------------------------------
class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Doc):
    """Every error of this API (OpenAI's shape)."""
    error: ErrorDetail


class SpendAndLimits(_Doc):
    """Spend of the current budget period and the limits that apply (own, else models.yaml's)."""
    user_id: str
    spend: float
    max_budget: float | None
    budget_duration: str | None
    budget_reset_at: str | None
    budget_applies_to: str
    max_parallel_requests: int | None
    rpm_limit: int | None
    tpm_limit: int | None


class KeyInfo(SpendAndLimits):
    key_id: str
    key_name: str
    key_alias: str | None
    models: list[str]
    created_at: str | None
    expires: str | None
    blocked: bool
    revoked: bool
    metadata: dict[str, Any]


class KeyInfoResponse(_Doc):
    key: str
    info: KeyInfo


class KeyGenerated(_Doc):
    key: str
    key_id: str
    token: str
    key_name: str
    key_alias: str | None
    user_id: str
    models: list[str]
    expires: str | None
    info: KeyInfo


class KeyList(_Doc):
    keys: list[str]
    data: list[KeyInfo]
    total_count: int
    page: int
    size: int


class KeyBlocked(_Doc):
    key: str
    blocked: bool


class KeysDeleted(_Doc):
    deleted_keys: list[str]


class UserInfoBody(SpendAndLimits):
    limits_set: dict[str, Any]


class UserInfo(_Doc):
    user_id: str
    user_info: UserInfoBody | None
    keys: list[KeyInfo]


class ModelInfoBody(_Doc):
    id: str
    provider: str
    mode: str
    max_input_tokens: int | None
    max_output_tokens: int | None
    input_cost_per_token: float
    output_cost_per_token: float
    commercial: bool
    alias_of: str | None


class ModelInfo(_Doc):
    model_name: str
    litellm_params: dict[str, Any]
    model_info: ModelInfoBody


class ModelInfoList(_Doc):
    data: list[ModelInfo]


class Cost(_Doc):
    cost: float
    model: str
    underlying_model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    estimated: bool
    currency: str


class NodesView(_Doc):
    """Nodes, their deployments and GPUs, and each local model's state."""
    profile: str | None
    nodes: list[dict[str, Any]]
    models: dict[str, Any]


class NodeCommandResult(_Doc):
    node: str
    deployments: list[str]
    status: int
    error: str | None


class NodeCommand(NodesView):
    results: list[NodeCommandResult]


class Readiness(_Doc):
    status: str
    db: str
    models: int


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d} for s, d in (
        (400, "Bad request: the message and `param` name the bad field"),
        (401, "Missing or invalid key"),
        (403, "Not allowed"),
        (404, "Not found"),
        (413, "Request body too large"),
    )}
