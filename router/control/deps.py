"""FastAPI dependencies of the control plane: the gateway, and who is calling (router/auth.py decides)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer
from starlette.responses import Response

from .. import auth
from ..store.base import KeyRecord

if TYPE_CHECKING:
    from ..app import Gateway

# Documents the bearer scheme in /openapi.json (Swagger's "Authorize"); router/auth.py reads the
# headers itself (`x-api-key` and `api-key` work too).
bearer = HTTPBearer(auto_error=False, description="A CBorg API key (sk-...), or the master key for admin routes")


def gateway(request: Request) -> "Gateway":
    return request.app.state.gw


def _headers(request: Request) -> dict[bytes, bytes]:
    return dict(request.scope["headers"])


async def master(request: Request, _: Any = Security(bearer)) -> None:
    """The master key (CBORG_MASTER_KEY) is required: 401 without it, 403 when the admin API is off."""
    auth.require_master(gateway(request).settings.master_key, _headers(request))


async def caller(request: Request, _: Any = Security(bearer)) -> KeyRecord | None:
    """The calling key, or None for the master key; 401 for a missing or bad key."""
    gw = gateway(request)
    return await gw.keys.caller(gw.settings.master_key, _headers(request))


MasterKey = Depends(master)
Caller = Depends(caller)


def json(obj: Any, status: int = 200) -> Response:
    """A JSON response written by orjson (the route's response_model documents it; it is not
    re-validated per response)."""
    return Response(orjson.dumps(obj), status, media_type="application/json")
