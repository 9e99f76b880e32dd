"""Minimal ASGI plumbing shared by the gateway and the inference node.

Why not Starlette: its Request, Router and Response objects cost tens of microseconds per
request, and the gateway's hot-path budget is 0.5 ms in all (docs/benchmarks.md). What we need
is small: a request with its body read under a size limit, JSON and streamed responses, a
path table, and OpenAI-shaped errors.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qsl

import orjson

from . import timers

log = logging.getLogger("cborg.http")

JSON_HEADERS = [(b"content-type", b"application/json")]
# On errors a retry cannot mend (or that the gateway has retried already): the openai and anthropic
# SDKs retry 5xx and 429 by themselves unless told not to.
NO_RETRY = (b"x-should-retry", b"false")

# OpenAI error "type" by status, as the official API and the openai SDK use them.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


def error_body(message: str, status: int = 400, type: str | None = None,
               code: str | None = None, param: str | None = None) -> bytes:
    """The one place that builds the OpenAI error body."""
    return orjson.dumps({"error": {"message": message, "type": type or error_type(status),
                                   "param": param, "code": code}})


class HTTPError(Exception):
    """Raised anywhere in a handler; turned into an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.status, self.type, self.code, self.param)


class Request:
    """One HTTP request: method, path, lowercase byte headers, query and a size-limited body."""

    __slots__ = ("scope", "receive", "method", "path", "headers", "_body", "state")

    def __init__(self, scope: dict, receive: Callable[[], Awaitable[dict]]):
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self._body: bytes | None = None
        self.state: dict[str, Any] = {}

    def header(self, name: bytes, default: str | None = None) -> str | None:
        v = self.headers.get(name)
        return v.decode("latin-1") if v is not None else default

    @property
    def query(self) -> dict[str, str]:
        qs = self.scope.get("query_string") or b""
        return dict(parse_qsl(qs.decode("latin-1"))) if qs else {}

    async def body(self, limit: int = 32 * 1024 * 1024) -> bytes:
        if self._body is not None:
            return self._body
        cl = self.headers.get(b"content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise HTTPError(413, f"Request body is larger than the limit of {limit} bytes.",
                            code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"Request body is larger than the limit of {limit} bytes.",
                                    code="request_too_large")
                chunks.append(chunk)
            if not msg.get("more_body"):
                break
        self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body

    async def json_object(self, limit: int = 32 * 1024 * 1024) -> dict:
        return loads_object(await self.body(limit))


def loads_object(raw: bytes) -> dict:
    """A request body that must be a JSON object, or the 400 that says what it is instead (every
    JSON endpoint of the gateway and the engines reads its body through this)."""
    if not raw:
        raise HTTPError(400, "Request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"Request body is not valid JSON: {e}") from None
    if type(body) is not dict:
        raise HTTPError(400, "Request body must be a JSON object.")
    return body


class ClientDisconnected(Exception):
    """The client went away before its response was sent."""


class CancelOnDisconnect:
    """`with CancelOnDisconnect(req):` cancels the current task if the client disconnects meanwhile,
    and raises ClientDisconnected in its place.

    The watcher is armed only after `after` seconds, so a fast request pays for one timer and a slow
    one (an LLM generating) stops its upstream work and frees its limits as soon as the client leaves.
    """

    __slots__ = ("req", "after", "task", "timer", "watch", "fired")

    def __init__(self, req: "Request", after: float = 0.05):
        self.req = req
        self.after = after
        self.watch: asyncio.Future | None = None
        self.fired = False

    def __enter__(self) -> "CancelOnDisconnect":
        self.task = asyncio.current_task()
        self.timer = timers.call_later(self.after, self._arm)
        return self

    def _arm(self) -> None:
        self.watch = asyncio.ensure_future(_wait_disconnect(self.req.receive))
        self.watch.add_done_callback(self._gone)

    def _gone(self, f: asyncio.Future) -> None:
        if not f.cancelled() and f.exception() is None and self.task is not None:
            self.fired = True
            self.task.cancel()

    def __exit__(self, et, ev, tb) -> None:
        self.timer.cancel()
        if self.watch is not None and not self.watch.done():
            self.watch.remove_done_callback(self._gone)
            self.watch.cancel()
        if self.fired and et is asyncio.CancelledError:
            self.task.uncancel()
            raise ClientDisconnected() from None


class Response:
    """A complete response: status, body bytes and extra headers."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, body: bytes, status: int = 200,
                 headers: list[tuple[bytes, bytes]] | None = None,
                 content_type: bytes = b"application/json"):
        self.status = status
        self.body = body
        self.headers = [(b"content-type", content_type)] + (headers or [])


def json_response(obj: Any, status: int = 200, headers: list | None = None) -> Response:
    return Response(orjson.dumps(obj), status, headers)


def error_response(err: HTTPError) -> Response:
    return Response(err.body(), err.status, list(err.headers))


class StreamResponse:
    """A streamed response. `body` yields byte chunks; they are sent as they come.

    When the client disconnects, the iteration is cancelled at once (even while it waits on an
    upstream), so the generator's `finally` runs and can close the upstream and account usage.
    """

    __slots__ = ("status", "body", "headers", "on_close")

    def __init__(self, body: AsyncIterator[bytes], status: int = 200,
                 headers: list[tuple[bytes, bytes]] | None = None,
                 content_type: bytes = b"text/event-stream",
                 on_close: Callable[[], Awaitable[None]] | None = None):
        self.status = status
        self.body = body
        self.headers = [(b"content-type", content_type), (b"cache-control", b"no-cache")] + (headers or [])
        self.on_close = on_close  # always awaited once the stream is over, however it ended


Handler = Callable[[Request], Awaitable["Response | StreamResponse"]]


async def send_response(resp: Response, send) -> None:
    headers = resp.headers
    headers.append((b"content-length", b"%d" % len(resp.body)))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    await send({"type": "http.response.body", "body": resp.body})


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def send_stream(resp: StreamResponse, req: Request, send) -> None:
    async def pump() -> None:
        await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
        async for chunk in resp.body:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

    pump_task = asyncio.ensure_future(pump())
    watch_task = asyncio.ensure_future(_wait_disconnect(req.receive))
    try:
        await asyncio.wait((pump_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not pump_task.done():  # client went away (or we are being cancelled)
            pump_task.cancel()
            try:
                await pump_task
            except BaseException:  # noqa: BLE001 - the stream is over either way
                pass
        watch_task.cancel()
        aclose = getattr(resp.body, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001
                pass
        if resp.on_close is not None:
            try:
                await resp.on_close()
            except Exception:  # noqa: BLE001
                log.exception("stream close hook failed")
    if pump_task.cancelled():
        return
    exc = pump_task.exception()
    if exc is not None:
        log.error("stream failed after headers were sent: %r", exc)
        return
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class App:
    """An ASGI app: a table of exact paths and of path prefixes, each with handlers by method.

    Every route is also served under `/v1` (the CBorg docs use a base URL without /v1; the
    openai SDK's default has it). With a `fallback` ASGI app (the gateway's FastAPI control
    plane), paths not in the table and the lifespan go to it: the table's routes pay for one dict
    lookup and no framework.
    """

    def __init__(self, on_startup: Callable[[], Awaitable[None]] | None = None,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None, fallback=None):
        self.exact: dict[str, dict[str, Handler]] = {}
        self.prefixes: list[tuple[str, dict[str, Handler]]] = []
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown
        self.fallback = fallback

    def route(self, path: str, method: str, handler: Handler, *, v1: bool = True) -> None:
        for p in ([path, "/v1" + path] if v1 else [path]):
            if p.endswith("/*"):
                base = p[:-1]
                for pre, table in self.prefixes:
                    if pre == base:
                        table[method] = handler
                        break
                else:
                    self.prefixes.append((base, {method: handler}))
                    self.prefixes.sort(key=lambda t: -len(t[0]))
            else:
                self.exact.setdefault(p, {})[method] = handler

    def _find(self, path: str) -> dict[str, Handler] | None:
        table = self.exact.get(path)
        if table is None and len(path) > 1 and path.endswith("/"):
            table = self.exact.get(path.rstrip("/"))
        if table is None:
            for pre, t in self.prefixes:
                if path.startswith(pre):
                    return t
        return table

    async def _lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    if self.on_startup:
                        await self.on_startup()
                except Exception as e:  # noqa: BLE001 - report and refuse to start
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                try:
                    if self.on_shutdown:
                        await self.on_shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope, receive, send) -> None:
        typ = scope["type"]
        if typ != "http":
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
            elif typ == "lifespan":
                await self._lifespan(receive, send)
            return
        table = self._find(scope["path"])
        if table is None and self.fallback is not None:
            await self.fallback(scope, receive, send)
            return
        req = Request(scope, receive)
        try:
            if table is None:
                raise HTTPError(404, f"Unknown path {req.path}.", code="not_found")
            handler = table.get(req.method)
            if handler is None:
                if req.method == "HEAD" and "GET" in table:
                    handler = table["GET"]
                else:
                    raise HTTPError(405, f"Method {req.method} is not allowed on {req.path}.",
                                    code="method_not_allowed", headers=[(b"allow", ", ".join(table).encode())])
            resp = await handler(req)
        except HTTPError as e:
            resp = error_response(e)
        except ClientDisconnected:
            return
        except Exception:  # noqa: BLE001 - never leak internals to the client
            log.exception("unhandled error on %s %s", req.method, req.path)
            resp = Response(error_body("Internal server error.", 500, code="internal_error"), 500)
        if type(resp) is Response:
            await send_response(resp, send)
        else:
            await send_stream(resp, req, send)
