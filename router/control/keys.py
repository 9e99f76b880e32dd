"""The key API (LiteLLM's paths and shapes): generate, update, block, delete, list (master key),
and /key/info (a key reads its own; the master key reads any)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Query, Request

from common.asgi import HTTPError

from ..auth import hash_key
from ..key_admin import KeyInputError, canonical_models, create_key, find_key, revoke_key
from ..store.base import KeyRecord
from .deps import Caller, MasterKey, gateway, json
from .schemas import KeyDelete, KeyGenerate, KeyRef, KeyTarget, KeyUpdate
from .views import ERRORS, KeyBlocked, KeyGenerated, KeyInfoResponse, KeyList, KeysDeleted, key_info

if TYPE_CHECKING:
    from ..app import Gateway

router = APIRouter(tags=["keys"], responses=ERRORS)


def bad(e: KeyInputError) -> HTTPError:
    return HTTPError(400, str(e), param=e.param, code="invalid_request_error")


async def lookup(gw: "Gateway", ref: str) -> KeyRecord:
    rec = await find_key(gw.store, ref)
    if rec is None:
        raise HTTPError(404, "No such key.", code="key_not_found", param="key")
    return rec


@router.post("/key/generate", dependencies=[MasterKey], response_model=KeyGenerated,
             summary="Create a key (shown once)")
async def generate(body: KeyGenerate, request: Request):
    gw = gateway(request)
    try:
        secret, rec = await create_key(gw.store, body, catalog=gw.catalog)
    except KeyInputError as e:
        raise bad(e) from None
    gw.keys.put(rec)
    info = key_info(rec, gw.policy)
    return json({"key": secret, "key_id": rec.id, "token": rec.key_hash, "key_name": rec.key_hint,
                 "key_alias": rec.alias, "user_id": rec.user_id, "models": rec.models,
                 "expires": info["expires"], "info": info})


@router.post("/key/update", dependencies=[MasterKey], response_model=KeyInfoResponse,
             summary="Change a key's models, limits, expiry, alias or metadata")
async def update(body: KeyUpdate, request: Request):
    gw = gateway(request)
    rec = await lookup(gw, body.key)
    changes = body.changes()
    try:
        canonical_models(gw.catalog, changes)
    except KeyInputError as e:
        raise bad(e) from None
    rec = await gw.store.update_key(rec.id, changes) if changes else rec
    gw.keys.put(rec)
    return json({"key": rec.id, "info": key_info(rec, gw.policy)})


async def set_blocked(gw: "Gateway", rec: KeyRecord, blocked: bool) -> KeyRecord:
    """Block or unblock a key: at once on this replica, on the others at their next key poll."""
    rec = await gw.store.update_key(rec.id, {"blocked": blocked})
    gw.keys.put(rec)
    return rec


async def revoke(gw: "Gateway", rec: KeyRecord) -> KeyRecord:
    """Revoke a key for good: at once on this replica, on the others at their next key poll."""
    rec = await revoke_key(gw.store, rec.id)
    gw.keys.put(rec)
    return rec


async def _set_blocked(request: Request, body: KeyTarget, blocked: bool):
    gw = gateway(request)
    rec = await set_blocked(gw, await lookup(gw, body.key), blocked)
    return json({"key": rec.id, "blocked": rec.blocked})


@router.post("/key/block", dependencies=[MasterKey], response_model=KeyBlocked, summary="Block a key")
async def block(body: KeyTarget, request: Request):
    return await _set_blocked(request, body, True)


@router.post("/key/unblock", dependencies=[MasterKey], response_model=KeyBlocked, summary="Unblock a key")
async def unblock(body: KeyTarget, request: Request):
    return await _set_blocked(request, body, False)


@router.post("/key/delete", dependencies=[MasterKey], response_model=KeysDeleted,
             summary="Revoke keys for good (all named, or none)")
async def delete(body: KeyDelete, request: Request):
    gw = gateway(request)
    refs = body.refs()
    if not refs:
        raise HTTPError(400, "Name the keys to delete: {\"keys\": [...]}.", param="keys")
    done = []
    for rec in [await lookup(gw, ref) for ref in refs]:   # all found, or none revoked
        done.append((await revoke(gw, rec)).id)
    return json({"deleted_keys": done})


@router.get("/key/list", dependencies=[MasterKey], response_model=KeyList,
            summary="List keys (newest first), optionally one user's, a page at a time")
async def list_keys(request: Request, user_id: KeyRef | None = None,
                    page: int = Query(1, ge=1, le=1_000_000), size: int = Query(1000, ge=1, le=1000)):
    gw = gateway(request)
    keys = await gw.store.list_keys(user_id)
    keys.sort(key=lambda k: k.created_at, reverse=True)
    chunk = keys[(page - 1) * size: page * size]
    return json({"keys": [k.id for k in chunk], "data": [key_info(k, gw.policy) for k in chunk],
                 "total_count": len(keys), "page": page, "size": size})


@router.get("/key/info", response_model=KeyInfoResponse,
            summary="A key's limits, budget and spend (a key reads its own; the master key any)")
async def get_key_info(request: Request, caller=Caller, key: KeyRef | None = None):
    gw = gateway(request)
    if caller is None:  # master key: any key, by secret, id, hash or alias
        if not key:
            raise HTTPError(400, "With the master key, name the key: /key/info?key=...", param="key")
        rec = await lookup(gw, key)
    else:
        rec = caller
        if key and key not in (caller.id, caller.key_hash, caller.alias) and hash_key(key) != caller.key_hash:
            raise HTTPError(403, "A key may only read its own info.", code="forbidden")
    fresh = await gw.store.find_key(rec.id)   # spend as of the last ledger flush (<= 0.5 s)
    return json({"key": rec.id, "info": key_info(fresh or rec, gw.policy, gw.limiter.spend_of(f"k:{rec.id}"))})

