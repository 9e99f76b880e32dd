"""One exception handler for a FastAPI control plane (the gateway's and the inference node's):
every error leaves in the OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`.

- the project's own `HTTPError` as raised anywhere (auth, stores, admin helpers);
- Starlette's `HTTPException` (unknown path 404, wrong method 405);
- `RequestValidationError` (pydantic): a 400 naming the first bad field, `param` set to it;
- anything else: a 500 with no internals in the body (the traceback goes to the log).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .asgi import HTTPError, error_body

log = logging.getLogger("cborg.http")

_JSON = "application/json"


def _response(status: int, body: bytes, headers: list[tuple[bytes, bytes]] | dict | None = None) -> Response:
    if isinstance(headers, list):
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    return Response(body, status, headers=headers or None, media_type=_JSON)


def field_name(loc: tuple[Any, ...]) -> str:
    """`("body", "models", 2)` -> `models[2]`; the leading body/query/path part is dropped."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


_NOT_OBJECT = "Request body must be a JSON object."


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message for the client and the field it names (the first bad one)."""
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    typ = err.get("type", "")
    if typ == "json_invalid":
        return "Request body is not valid JSON.", None
    if loc == ("body",) and typ in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return _NOT_OBJECT, None
    name = field_name(loc)
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if typ == "missing":
        msg = "required"
    elif typ == "extra_forbidden":
        msg = "not a field of this request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{name}: {msg}{more}" if name else msg + more), (name or None)


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _own(request: Request, e: HTTPError) -> Response:
        return _response(e.status, e.body(), e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 404:
            body = error_body(f"Unknown path {request.url.path}.", 404, code="not_found")
        elif e.status_code == 405:
            body = error_body(f"Method {request.method} is not allowed on {request.url.path}.", 405,
                              code="method_not_allowed")
        else:
            body = error_body(str(e.detail), e.status_code, code="request_too_large" if e.status_code == 413 else None)
        return _response(e.status_code, body, dict(e.headers) if e.headers else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        msg, param = validation_message(list(e.errors()))
        ctype = request.headers.get("content-type", "")
        if msg == _NOT_OBJECT and ctype and "json" not in ctype:
            # curl -d sends a form: FastAPI then reads the JSON as bytes, not as the object it is
            msg = (f"Request body must be a JSON object sent as Content-Type: application/json (it came as "
                   f"{ctype.split(';')[0][:80]}; with curl, add -H 'Content-Type: application/json').")
        return _response(400, error_body(msg, 400, code="invalid_request_error", param=param))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return _response(500, error_body("Internal server error.", 500, code="internal_error"))
