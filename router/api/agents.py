"""The coding agents' surface on the hot path: Anthropic Messages (Claude Code, the anthropic SDK) and
OpenAI Responses (Codex, `client.responses`), for every chat model of the catalog.

- POST /v1/messages, POST /v1/messages/count_tokens: errors in Anthropic's shape, same statuses as the
  OpenAI surface;
- POST /v1/responses, GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items,
  POST /v1/responses/compact: errors in OpenAI's shape.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson

from common.asgi import App, ClientDisconnected, HTTPError, Request, Response, json_response

from .. import upstream_errors
from ..agents import MessagesCall, ResponsesCall, owned_response
from ..auth import bearer_token
from ..dialects import anthropic_messages as am
from ..pipeline import TOO_DEEP, Call, apply_alias, apply_defaults, parse_object
from ..providers import adapter
from ..upstream import Timeouts, UpstreamError

if TYPE_CHECKING:
    from ..app import Gateway
    from ..catalog import Route
    from ..providers.base import Endpoint

log = logging.getLogger("cborg.agents")


def anthropic_error(e: HTTPError) -> Response:
    return Response(am.error_body(e.status, e.message), e.status, list(e.headers))


async def _in_anthropic_shape(handler, req: Request):
    """A Messages route's answer; its errors in Anthropic's shape, an unexpected one too (common/asgi.App
    knows only OpenAI's), logged as the App would."""
    try:
        return await handler(req)
    except HTTPError as e:
        return anthropic_error(e)
    except ClientDisconnected:
        raise
    except Exception:  # noqa: BLE001 - never leak internals to the client
        log.exception("unhandled error on %s %s", req.method, req.path)
        return anthropic_error(HTTPError(500, "Internal server error."))


async def exchange(gw: "Gateway", ep: "Endpoint", route: "Route", method: bytes, path: str,
                   headers: list, body: bytes = b"") -> tuple[int, bytes]:
    """One upstream request outside an inference call (count_tokens, a stored response): status and body."""
    t = route.provider.timeouts
    try:
        resp = await gw.pool.request(ep.target, method, path, headers, body,
                                     Timeouts(t.connect, t.first_byte, t.read, t.total))
        return resp.status, await resp.read()
    except UpstreamError as e:
        raise upstream_errors.from_transport(e, route, ep) from None


class _CountRequest(MessagesCall):
    """count_tokens takes a Messages request without max_tokens."""

    def parse(self, raw: bytes) -> dict:
        self.body = body = parse_object(raw)
        am.check({**body, "max_tokens": 1})
        am.check_blocks(body)
        return body


def register(app: App, gw: "Gateway") -> None:
    pipeline = gw.pipeline

    async def messages(req: Request):
        return await _in_anthropic_shape(lambda r: pipeline.handle(r, "chat", MessagesCall(gw, r.headers)), req)

    async def count_tokens(req: Request):
        return await _in_anthropic_shape(lambda r: _count_tokens(gw, r), req)

    async def responses(req: Request):
        return await pipeline.handle(req, "chat", ResponsesCall(gw, req.headers))

    async def compact(req: Request):
        return await pipeline.handle(req, "chat", ResponsesCall(gw, req.headers, compact=True))

    async def stored(req: Request):
        return await _stored_response(gw, req)

    app.route("/messages", "POST", messages)
    app.route("/messages/count_tokens", "POST", count_tokens)
    app.route("/responses", "POST", responses)
    app.route("/responses/compact", "POST", compact)
    app.route("/responses/*", "GET", stored)
    app.route("/responses/*", "DELETE", stored)


async def _count_tokens(gw: "Gateway", req: Request) -> Response:
    """Exact for anthropic/* (Anthropic counts) and local models (their engine's tokenizer, where it has one);
    otherwise `am.estimate_tokens`, which is meant never to undercount. Not an inference call: no ledger
    row, unless a limit refuses it (as any refused call)."""
    inbound = _CountRequest(gw, req.headers)
    key, raw, body, route = await gw.pipeline._accept(req, "chat", inbound)
    # The key's parallel and request-rate limits (and a spent budget) apply as to any call: it may
    # cost an upstream call, against the lab's own rate limits. No tokens are counted against it.
    call = Call(gw, key, route, "chat", False)
    call.endpoint = "messages/count_tokens"
    await gw.pipeline.admit(call)
    try:
        return await _count(gw, req, body, route)
    finally:
        call.admission.finish(call)


async def _count(gw: "Gateway", req: Request, body: dict, route) -> Response:
    ep, release = gw.endpoint_for(route)
    try:
        if route.provider.protocol == "anthropic":
            body = dict(body)
            apply_defaults(route, body)
            if route.system_prompt:
                am.with_system(body, route.system_prompt)
            try:
                ureq = adapter("anthropic").native(ep, route, "/v1/messages/count_tokens", body, req.headers)
            except (orjson.JSONEncodeError, RecursionError):    # orjson reads 1,024 levels, writes 254
                raise HTTPError(400, TOO_DEEP, code="invalid_json") from None
            status, data = await exchange(gw, ep, route, b"POST", ureq.path, ureq.headers, ureq.body)
            if status >= 400:
                raise upstream_errors.from_response(status, data, None, adapter("anthropic").error_message(status, data),
                                                    route, ep)
            return Response(data)
        if route.system_prompt:
            body = dict(body)
            am.with_system(body, route.system_prompt)
        if route.provider.local:
            try:
                chat = am.to_chat({**body, "max_tokens": 1}, route.model)
                apply_alias(route, "chat", chat)
                payload = orjson.dumps({"model": ep.extra.get("served_model") or route.model.model,
                                        "messages": chat["messages"]})
            except (orjson.JSONEncodeError, RecursionError):
                raise HTTPError(400, TOO_DEEP, code="invalid_json") from None
            status, data = await exchange(gw, ep, route, b"POST", "/tokenize", adapter("openai").headers_for(ep),
                                          payload)
            if status == 200:
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    obj = None
                count = obj.get("count") if type(obj) is dict else None
                if type(count) is int and count >= 0:
                    return json_response({"input_tokens": count})
            log.debug("count_tokens: %s has no tokenizer endpoint (HTTP %d): estimating", route.name, status)
        return json_response({"input_tokens": am.estimate_tokens(body)})
    finally:
        release()


async def _stored_response(gw: "Gateway", req: Request) -> Response:
    """GET /v1/responses/{id}[/input_items], DELETE /v1/responses/{id}: the caller's own stored responses.
    Those OpenAI keeps are read from (or deleted at) OpenAI once the owner is checked here."""
    key = await gw.keys.verify(bearer_token(req.headers))
    rest = req.path.split("/responses/", 1)[1]
    rid, _, sub = rest.partition("/")
    if sub not in ("", "input_items") or (sub and req.method != "GET"):
        raise HTTPError(404, f"Unknown path {req.path}.", code="not_found")
    rec = await owned_response(gw, key, rid)
    if rec.native:
        route = gw.catalog.resolve(rec.model)
        if route is None:
            raise HTTPError(404, f"Response with id '{rid}' not found.", code="not_found")
        ep, release = gw.endpoint_for(route)
        try:
            path = f"/responses/{rid}" + (f"/{sub}" if sub else "")
            qs = req.scope.get("query_string") or b""
            status, data = await exchange(gw, ep, route, req.method.encode(), path + ("?" + qs.decode() if qs else ""),
                                          adapter("openai").headers_for(ep))
        finally:
            release()
        if req.method == "DELETE" and status < 500:
            await gw.responses.delete(rid)
        if status >= 400:
            raise upstream_errors.from_response(status, data, None, adapter("openai").error_message(status, data),
                                                route, ep)
        return Response(data)
    if req.method == "DELETE":
        await gw.responses.delete(rid)
        return json_response({"id": rid, "object": "response", "deleted": True})
    data = rec.content()
    if sub == "input_items":
        items = data["input"]
        if req.query.get("order") != "asc":
            items.reverse()          # newest first, as the API lists them by default
        return json_response({"object": "list", "data": items, "first_id": items[0].get("id") if items else None,
                              "last_id": items[-1].get("id") if items else None, "has_more": False})
    return json_response(data["response"])
