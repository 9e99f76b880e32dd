"""Creating and changing API keys and users' limits: shared by the admin HTTP API, `cborg keys`
and `cborg users`."""
from __future__ import annotations

import time
from typing import Any

from .auth import generate_key, hash_key, key_hint, new_key_id
from .durations import parse_duration
from .store.base import KeyRecord, Store

DEFAULT_EXPIRY = "365d"

# Fields an admin may set, with the LiteLLM names accepted for each: limits (keys and users)...
_LIMIT_NAMES = {
    "max_parallel": ("max_parallel", "max_parallel_requests", "parallel"),
    "rpm": ("rpm", "rpm_limit"),
    "tpm": ("tpm", "tpm_limit"),
    "max_budget": ("max_budget", "budget"),
    "budget_period": ("budget_period", "budget_duration"),
}
# ... and what only keys have.
_FIELD_NAMES = {
    "alias": ("alias", "key_alias"),
    "models": ("models",),
    **_LIMIT_NAMES,
    "metadata": ("metadata",),
    "blocked": ("blocked",),
}


class KeyInputError(ValueError):
    """A bad field in a key request; the message names it."""


def _int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or not str(v).strip().lstrip("-").isdigit():
        raise KeyInputError(f"{name} must be a whole number")
    if int(v) < 0:
        raise KeyInputError(f"{name} must not be negative")
    return int(v)


def _float(name: str, v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise KeyInputError(f"{name} must be a number") from None
    if f < 0:
        raise KeyInputError(f"{name} must not be negative")
    return f


def _bool(name: str, v: Any) -> bool:
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    t = str(v).strip().lower()
    if t in ("true", "yes", "1"):
        return True
    if t in ("false", "no", "0"):
        return False
    raise KeyInputError(f"{name} must be true or false")


def _named(data: dict[str, Any], names: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """The fields present in `data` under any of their names."""
    out: dict[str, Any] = {}
    for field, aliases in names.items():
        for n in aliases:
            if n in data:
                out[field] = data[n]
                break
    return out


def _check_limits(out: dict[str, Any]) -> None:
    """Limit fields validated in place (None clears one: the default applies again)."""
    for f in ("max_parallel", "rpm", "tpm"):
        if f in out:
            out[f] = _int(f, out[f])
    if "max_budget" in out:
        out["max_budget"] = _float("max_budget", out["max_budget"])
    if out.get("budget_period") is not None:
        try:
            parse_duration(out["budget_period"])
        except ValueError as e:
            raise KeyInputError(f"budget_period: {e}") from None


def user_changes(data: dict[str, Any]) -> dict[str, Any]:
    """Validated changes of a user's limits from a request body (LiteLLM or CBorg field names)."""
    unknown = set(data) - {n for names in _LIMIT_NAMES.values() for n in names} - {"user_id", "user"}
    if unknown:
        raise KeyInputError(f"unknown user fields: {', '.join(sorted(unknown))} (a user has max_parallel_requests, "
                            "rpm_limit, tpm_limit, max_budget, budget_duration)")
    out = _named(data, _LIMIT_NAMES)
    _check_limits(out)
    return out


def key_changes(data: dict[str, Any]) -> dict[str, Any]:
    """Validated KeyRecord changes from a request body (LiteLLM or CBorg field names)."""
    out = _named(data, _FIELD_NAMES)
    if "models" in out:
        m = out["models"]
        if isinstance(m, str):
            m = [x.strip() for x in m.split(",") if x.strip()]
        if not isinstance(m, list) or not all(isinstance(x, str) for x in m):
            raise KeyInputError("models must be a list of model names")
        out["models"] = m
    _check_limits(out)
    if "metadata" in out and not isinstance(out["metadata"], dict):
        raise KeyInputError("metadata must be an object")
    if "blocked" in out:
        out["blocked"] = _bool("blocked", out["blocked"])
    for d in ("duration", "expires"):
        if d in data:
            try:
                secs = parse_duration(data[d])
            except ValueError as e:
                raise KeyInputError(f"{d}: {e}") from None
            out["expires_at"] = None if secs is None else time.time() + secs
    return out


async def create_key(store: Store, user_id: str, *, expires: str | None = DEFAULT_EXPIRY,
                     fields: dict[str, Any] | None = None) -> tuple[str, KeyRecord]:
    """Make a key; returns the secret (shown once) and the stored record."""
    if not user_id or not isinstance(user_id, str):
        raise KeyInputError("user_id is required (the key owner's e-mail)")
    changes = key_changes({**(fields or {}), "expires": expires})
    secret = generate_key()
    now = time.time()
    rec = KeyRecord(id=new_key_id(), key_hash=hash_key(secret), key_hint=key_hint(secret), user_id=user_id,
                    created_at=now, updated_at=now, **changes)
    await store.create_key(rec)
    return secret, rec


async def find_key(store: Store, ref: str) -> KeyRecord | None:
    """A key by its secret (sk-...), id, hash or alias."""
    if ref.startswith("sk-"):
        return await store.key_by_hash(hash_key(ref))
    return await store.find_key(ref)


async def revoke_key(store: Store, key_id: str) -> KeyRecord | None:
    return await store.update_key(key_id, {"revoked_at": time.time()})
