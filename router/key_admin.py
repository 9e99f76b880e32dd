"""Creating and changing API keys and users' limits: shared by the admin HTTP API (router/control),
`cborg keys` and `cborg users`. Input is validated by the schemas of router/control/schemas.py,
so the CLI and the HTTP API accept and refuse exactly the same things."""
from __future__ import annotations

import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from common.control_errors import validation_message

from .auth import generate_key, hash_key, key_hint, new_key_id
from .control.schemas import KeyGenerate
from .store.base import KeyRecord, Store

M = TypeVar("M", bound=BaseModel)


class KeyInputError(ValueError):
    """A bad field in a key or user request; the message names it, `param` is the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def validate(schema: type[M], data: dict[str, Any]) -> M:
    """`data` checked against an admin schema; KeyInputError naming the first bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(list(e.errors()))
        raise KeyInputError(msg, param) from None


def canonical_models(catalog, changes: dict[str, Any]) -> None:
    """A key's model list in the catalog's canonical spellings (what the per-request check
    compares); an unknown name is an error: a typo would make a key refused everywhere."""
    if changes.get("models"):
        try:
            changes["models"] = catalog.key_models(changes["models"])
        except ValueError as e:
            raise KeyInputError(f"models: {e}", "models") from None


async def create_key(store: Store, user_id: str | KeyGenerate, *, expires: str | None = None,
                     fields: dict[str, Any] | None = None, catalog=None) -> tuple[str, KeyRecord]:
    """Make a key; returns the secret (shown once) and the stored record. `user_id` is a validated
    KeyGenerate, or the owner with `fields` (admin field names) to validate here."""
    if isinstance(user_id, KeyGenerate):
        spec = user_id
    else:
        data = {**(fields or {}), "user_id": user_id}
        if expires is not None:
            data["duration"] = expires
        spec = validate(KeyGenerate, data)
    changes = spec.changes()
    if catalog is not None:
        canonical_models(catalog, changes)
    secret = generate_key()
    now = time.time()
    rec = KeyRecord(id=new_key_id(), key_hash=hash_key(secret), key_hint=key_hint(secret), user_id=spec.user_id,
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
