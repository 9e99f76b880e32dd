"""The user API (LiteLLM's): a user's spend, limits and keys; an admin sets a user's own limits."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from common.asgi import HTTPError

from .deps import Caller, MasterKey, gateway, json
from .schemas import Text, UserUpdate
from .views import ERRORS, UserInfo, user_info_of

if TYPE_CHECKING:
    from ..app import Gateway

router = APIRouter(tags=["users"], responses=ERRORS)


async def set_limits(gw: "Gateway", uid: str, changes: dict) -> None:
    """Store a user's own limits (UserUpdate.changes()): this replica applies them at once, the
    others at their next key poll."""
    gw.keys.users[uid] = await gw.store.update_user(uid, changes)
    for k in await gw.store.list_keys(uid):
        gw.keys.put(k)


@router.post("/user/update", dependencies=[MasterKey], response_model=UserInfo,
             summary="Set a user's own limits (null puts one back to models.yaml's default)")
async def update_user(body: UserUpdate, request: Request):
    gw = gateway(request)
    uid = body.user_id
    changes = body.changes()
    if changes:
        await set_limits(gw, uid, changes)
    return json(await user_info_of(gw, uid) or {"user_id": uid, "user_info": None, "keys": []})


@router.get("/user/info", response_model=UserInfo,
            summary="A user's spend, the limits that apply and their keys (a key reads its own user)")
async def user_info(request: Request, caller=Caller, user_id: Text | None = None):
    gw = gateway(request)
    if caller is None:
        if not user_id:
            raise HTTPError(400, "With the master key, name the user: /user/info?user_id=...", param="user_id")
        uid = user_id
    else:
        uid = caller.user_id
        if user_id not in (None, uid):
            raise HTTPError(403, "A key may only read its own user's info.", code="forbidden")
    info = await user_info_of(gw, uid)
    if info is None:
        raise HTTPError(404, f"No such user: {uid}.", code="user_not_found", param="user_id")
    return json(info)
