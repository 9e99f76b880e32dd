"""The key and user admin API (LiteLLM-style paths and shapes), guarded by CBORG_MASTER_KEY."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.asgi import App, HTTPError, Request, json_response

from ..key_admin import KeyInputError, create_key, find_key, key_changes, revoke_key, user_changes
from .. import auth
from .info import key_info, user_info_of

if TYPE_CHECKING:
    from ..app import Gateway


def require_master(gw: "Gateway", req: Request) -> None:
    auth.require_master(gw.settings.master_key, req.headers)


async def _body(req: Request, gw: "Gateway") -> dict[str, Any]:
    data = await req.json(gw.settings.max_body_bytes)
    if not isinstance(data, dict):
        raise HTTPError(400, "Request body must be a JSON object.")
    return data


def _canonical_models(gw: "Gateway", fields: dict) -> None:
    m = fields.get("models")
    if isinstance(m, str):
        m = [x.strip() for x in m.split(",") if x.strip()]
    if isinstance(m, list) and all(isinstance(x, str) for x in m):
        try:
            fields["models"] = gw.catalog.key_models(m)
        except ValueError as e:
            raise KeyInputError(f"models: {e}") from None


async def apply_user_changes(gw: "Gateway", uid: str, changes: dict[str, Any]) -> None:
    """Store a user's limits; this replica applies them at once (others at their next key poll)."""
    gw.keys.users[uid] = await gw.store.update_user(uid, changes)
    for k in await gw.store.list_keys(uid):
        gw.keys.put(k)


def register(app: App, gw: "Gateway") -> None:
    async def lookup(ref: Any):
        if not isinstance(ref, str) or not ref:
            raise HTTPError(400, "Name the key: 'key' (the secret, its id, hash or alias).", param="key")
        rec = await find_key(gw.store, ref)
        if rec is None:
            raise HTTPError(404, "No such key.", code="key_not_found", param="key")
        return rec

    async def generate(req: Request):
        require_master(gw, req)
        d = await _body(req, gw)
        user = d.get("user_id") or d.get("user")
        fields = {k: v for k, v in d.items() if k not in ("user_id", "user", "duration", "expires")}
        try:   # LiteLLM names the lifetime `duration`; CBorg's CLI and /key/update say `expires`
            _canonical_models(gw, fields)
            secret, rec = await create_key(gw.store, user, expires=d.get("duration", d.get("expires", "365d")),
                                           fields=fields)
        except KeyInputError as e:
            raise HTTPError(400, str(e)) from None
        gw.keys.put(rec)
        info = key_info(rec, gw.policy)
        return json_response({"key": secret, "key_id": rec.id, "token": rec.key_hash, "key_name": rec.key_hint,
                              "key_alias": rec.alias, "user_id": rec.user_id, "models": rec.models,
                              "expires": info["expires"], "info": info})

    async def update(req: Request):
        require_master(gw, req)
        d = await _body(req, gw)
        rec = await lookup(d.get("key"))
        try:
            changes = key_changes({k: v for k, v in d.items() if k != "key"})
            _canonical_models(gw, changes)
        except KeyInputError as e:
            raise HTTPError(400, str(e)) from None
        rec = await gw.store.update_key(rec.id, changes) if changes else rec
        gw.keys.put(rec)
        return json_response({"key": rec.id, "info": key_info(rec, gw.policy)})

    async def set_blocked(req: Request, blocked: bool):
        require_master(gw, req)
        d = await _body(req, gw)
        rec = await lookup(d.get("key"))
        rec = await gw.store.update_key(rec.id, {"blocked": blocked})
        gw.keys.put(rec)
        return json_response({"key": rec.id, "blocked": rec.blocked})

    async def block(req: Request):
        return await set_blocked(req, True)

    async def unblock(req: Request):
        return await set_blocked(req, False)

    async def delete(req: Request):
        require_master(gw, req)
        d = await _body(req, gw)
        refs = d.get("keys") or ([d["key"]] if d.get("key") else [])
        if not isinstance(refs, list) or not refs:
            raise HTTPError(400, "Name the keys to delete: {\"keys\": [...]}.", param="keys")
        done = []
        for rec in [await lookup(ref) for ref in refs]:   # all found, or none revoked
            rec = await revoke_key(gw.store, rec.id)
            gw.keys.put(rec)
            done.append(rec.id)
        return json_response({"deleted_keys": done})

    async def list_keys(req: Request):
        require_master(gw, req)
        user = req.query.get("user_id")
        keys = await gw.store.list_keys(user)
        return json_response({"keys": [k.id for k in keys], "data": [key_info(k, gw.policy) for k in keys],
                              "total_count": len(keys)})

    async def update_user(req: Request):
        """A user's own limits (LiteLLM's /user/update): null puts one back to models.yaml's default."""
        require_master(gw, req)
        d = await _body(req, gw)
        uid = d.get("user_id") or d.get("user")
        if not isinstance(uid, str) or not uid.strip():
            raise HTTPError(400, "Name the user: 'user_id' (their e-mail).", param="user_id")
        try:
            changes = user_changes(d)
        except KeyInputError as e:
            raise HTTPError(400, str(e)) from None
        if changes:
            await apply_user_changes(gw, uid, changes)
        return json_response(await user_info_of(gw, uid) or {"user_id": uid, "user_info": None, "keys": []})

    app.route("/key/generate", "POST", generate)
    app.route("/key/update", "POST", update)
    app.route("/key/delete", "POST", delete)
    app.route("/key/block", "POST", block)
    app.route("/key/unblock", "POST", unblock)
    app.route("/key/list", "GET", list_keys)
    app.route("/user/update", "POST", update_user)
