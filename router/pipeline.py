"""The path of an inference request: authenticate, resolve, admit, call upstream, translate, account.

One `Call` object carries a request's facts from start to end, so that whatever way it ends
(response, error, stream end, client gone) it is accounted exactly once (`Call.finish`).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import orjson

from common.asgi import CancelOnDisconnect, ClientDisconnected, HTTPError, Request, Response, StreamResponse, loads_object

from .accounting.cost import cost_of, estimate_tokens, format_cost, worst_cost
from .accounting.usage import valid_usage
from .auth import allowed, bearer_token
from .catalog import Route
from .providers import adapter
from .providers.base import Endpoint, StreamError, normalize_usage, scrub
from .sse import DONE, data_event
from . import upstream_errors
from .upstream import ClosedError, ConnectError, ConnectTimeout, Timeouts, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from .agents import Inbound
    from .app import Gateway
    from .store.base import KeyRecord

log = logging.getLogger("cborg.pipeline")

_REQUIRED = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
_ENDPOINT = {"chat": "chat/completions", "completions": "completions", "embeddings": "embeddings"}
_MODE = {"chat": "chat", "completions": "chat", "embeddings": "embedding"}
_KIND = {"chat": "a chat", "embedding": "an embedding"}
_RETRY_STATUS = frozenset((408, 409, 425, 429, 500, 502, 503, 504, 529))
_RA_HOLD = 4          # an upstream's retry-after up to 4 x max_backoff is waited out here; longer goes to the client
_NODE_REPICKS = 3      # replicas of a local model tried when engines are found gone
MAX_HOPS = 4           # gateways a request may pass through (x-cborg-hops): a chain longer than this is a loop
_HOP_PROTOCOLS = frozenset(("openai", "anthropic"))   # the upstream APIs another CBorg gateway can be behind
_HOPS = [(b"x-cborg-hops", b"%d" % n) for n in range(MAX_HOPS + 1)]
_NOT_STREAMS = frozenset(("application/json", "text/html"))   # a stream request's answer that is not a stream


class _EngineGone(Exception):
    """A node's engine refused the connection: it stopped since the last status poll."""


_ID_PREFIX = "req-" + os.urandom(4).hex()
_ids = itertools.count(1)


def _request_id() -> str:
    """Unique per process start (random prefix) and cheap (a counter): no syscall per request."""
    return f"{_ID_PREFIX}{next(_ids):x}"


def apply_defaults(route: Route, body: dict) -> None:
    """The alias's or model's parameter defaults (models.yaml `params`), where the caller gave none."""
    for k, v in route.params.items():
        if k not in body:
            body[k] = v


def apply_alias(route: Route, op: str, body: dict) -> None:
    """The alias's system prompt goes first; the caller's own system message, if any, follows."""
    apply_defaults(route, body)
    if route.system_prompt and op == "chat":
        body["messages"] = [{"role": "system", "content": route.system_prompt}, *body["messages"]]


def _retry_after(resp_headers: UpstreamResponse | None) -> float | None:
    if resp_headers is None:
        return None
    v = resp_headers.header("retry-after-ms")
    if v:
        try:
            return float(v) / 1000
        except ValueError:
            pass
    v = resp_headers.header("retry-after")
    if v:
        try:
            return float(v)
        except ValueError:
            return None
    return None


def parse_object(raw: bytes) -> dict:
    """A request body: a JSON object naming a model (400s that say what is wrong)."""
    body = loads_object(raw)
    model = body.get("model")
    if not model or type(model) is not str:
        raise HTTPError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    v = body.get("stream")
    if v is not None and type(v) is not bool:
        raise HTTPError(400, f"Invalid type for 'stream': expected a boolean (true or false), got {_kind(v)}.",
                        param="stream", code="invalid_type")
    v = body.get("stop")
    if v is not None and type(v) is not str:
        _check_stop("stop", v)
    v = body.get("stop_sequences")            # (Anthropic's)
    if v is not None:
        _check_stop("stop_sequences", v)
    return body


def _check_stop(field: str, v) -> None:
    if type(v) is list:
        for x in v:
            if type(x) is not str:
                break
        else:
            return
    raise HTTPError(400, f"Invalid type for '{field}': expected a string or a list of strings, got {_kind(v)}.",
                    param=field, code="invalid_type")


_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _kind(v) -> str:
    """How a 400 names a JSON value's type."""
    if type(v) is list and not all(type(x) is str for x in v):
        return "a list with a non-string item"
    return _KINDS.get(type(v), "null")


TOO_DEEP = ("Request JSON is nested too deeply (the gateway relays at most 254 levels of arrays and "
            "objects).")


class Call:
    """One inference request's state, from admission to accounting."""

    __slots__ = ("gw", "id", "key", "route", "served", "op", "t0", "ttft", "status", "usage", "cost",
                 "stream", "include_usage", "admission", "done", "error", "prompt_estimate", "chunks", "limit",
                 "inbound", "endpoint", "reserve", "hops")

    def __init__(self, gw: "Gateway", key: "KeyRecord", route: Route, op: str, stream: bool,
                 inbound: "Inbound | None" = None):
        self.gw = gw
        self.id = _request_id()
        self.key = key
        self.route = route
        self.served: Route = route
        self.op = op
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.status = 200
        self.usage: dict | None = None
        self.cost = 0.0
        self.stream = stream
        self.include_usage = False
        self.admission: Any = None
        self.done = False
        self.error: str | None = None
        self.prompt_estimate = 0
        self.reserve = 0.0                 # the worst-case cost held against budgets while it runs
        self.hops = 0                      # gateways this request came through (x-cborg-hops)
        self.chunks = 0
        self.limit: str | None = None      # the limit that refused it, if one did
        self.inbound = inbound             # a request in another API's shape (router/agents.py), or None
        self.endpoint = inbound.endpoint if inbound is not None else _ENDPOINT[op]

    def account(self, usage: dict | None) -> float:
        if usage is not None:
            served = self.served
            self.usage = usage = valid_usage(usage, f"{served.provider_name} ({served.name})")
            self.cost = cost_of(self.served.model.price, usage) if self.served.commercial else 0.0
        return self.cost

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.usage is None and self.stream and self.chunks:
            # Stream cut before the upstream's usage arrived: count what was delivered.
            self.account({"prompt_tokens": self.prompt_estimate, "completion_tokens": self.chunks,
                          "total_tokens": self.prompt_estimate + self.chunks,
                          "prompt_tokens_details": {"cached_tokens": 0}, "estimated": True})
        try:
            self.gw.accountant.finish(self)
        except Exception:  # noqa: BLE001 - accounting must never break a response
            log.exception("accounting failed for %s", self.id)



def _build_error(e: TypeError) -> HTTPError:
    """A TypeError while writing the upstream request: orjson past its 254 levels of nesting, or a
    field of a type the translation cannot take (which the dialects should have refused first)."""
    if "Recursion limit" in str(e):                 # orjson reads 1,024 levels, writes 254
        return HTTPError(400, TOO_DEEP, code="invalid_json")
    return HTTPError(400, f"The request has a field of the wrong type for this model ({e}).",
                     code="invalid_request")

class Pipeline:
    def __init__(self, gw: "Gateway"):
        self.gw = gw

    # -- entry point -------------------------------------------------------------------
    async def handle(self, req: Request, op: str, inbound: "Inbound | None" = None) -> Response | StreamResponse:
        """One call; `inbound` carries a request in another API's shape (Anthropic Messages, OpenAI Responses),
        which it turns into each candidate's upstream request and back (router/agents.py)."""
        gw = self.gw
        try:
            key, raw, body, route = await self._accept(req, op, inbound)
            if inbound is not None:
                await inbound.prepare(key, route)
        except HTTPError as e:   # refused before admission: counted under model "-" (names are the client's)
            gw.metrics.requests[("-", e.status)] += 1
            raise
        stream = op != "embeddings" and body.get("stream") is True
        call = Call(gw, key, route, op, stream, inbound)
        h = req.headers.get(b"x-cborg-hops")
        if h is not None:
            call.hops = int(h)            # (checked in _accept)
        if stream:
            so = body.get("stream_options")
            call.include_usage = type(so) is dict and so.get("include_usage") is True
        if inbound is None:
            apply_alias(route, op, body)
        call.prompt_estimate = estimate_tokens(raw)
        if route.commercial:      # (free models have no budget to reserve against, nor commercial fallbacks)
            call.reserve = worst_cost(route.model, body, call.prompt_estimate)
            if route.model.fallbacks:     # any of them may serve it: hold what the priciest can cost
                for r in self._candidates(call)[1:]:
                    call.reserve = max(call.reserve, worst_cost(r.model, body, call.prompt_estimate))
        await self.admit(call)
        gw.metrics.in_flight += 1
        try:
            with CancelOnDisconnect(req):
                return await self._call_upstream(call, body, raw)
        except BaseException as e:
            if isinstance(e, HTTPError):
                call.status = e.status
                call.error = e.message
            elif isinstance(e, ClientDisconnected):
                call.status = 499          # nginx's "client closed request"
                call.error = "client disconnected before the response"
            else:
                call.status = 500
            if not call.done:
                call.finish()
            raise

    async def admit(self, call: Call) -> None:
        """The call's limits checked and held (call.admission); a refusal is accounted, then raised."""
        gw = self.gw
        try:
            # Without an await where the limiter can answer at once (the in-process one, nearly always).
            adm = gw.limiter.admit_now(call)
            call.admission = adm if adm is not None else await gw.limiter.admit(call)
        except HTTPError as e:
            gw.accountant.refused(call, e)
            raise

    async def _accept(self, req: Request, op: str, inbound: "Inbound | None") -> tuple["KeyRecord", bytes, dict, Route]:
        """Who is calling, for which model: 401/400/404/403 before anything is counted against limits."""
        gw = self.gw
        if req.headers.get(b"x-cborg-via") == gw.via:
            raise HTTPError(508, "This request came back to the gateway that sent it: a provider's base URL "
                                 "(e.g. OPENAI_BASE_URL) points at this gateway.", code="loop_detected",
                            headers=[upstream_errors.NO_RETRY])
        h = req.headers.get(b"x-cborg-hops")
        if h is not None and not h.isdigit():
            raise HTTPError(400, "The x-cborg-hops header must be a whole number (the gateways this request "
                                 "has passed through); leave it out.", param="x-cborg-hops", code="invalid_header")
        if h is not None and int(h) >= MAX_HOPS:
            raise HTTPError(508, f"This request has passed through {h.decode('latin-1')[:8]} gateways (at most "
                                 f"{MAX_HOPS - 1} may relay it): gateways whose provider base URLs point at each "
                                 "other.", code="loop_detected", headers=[upstream_errors.NO_RETRY])
        key = await gw.keys.verify(bearer_token(req.headers))
        raw = await req.body(gw.settings.max_body_bytes)
        body = self._parse(raw, op) if inbound is None else inbound.parse(raw)
        name = body["model"]
        route = gw.catalog.resolve(name)
        if route is None:
            route = gw.resolve_dynamic(name)
            if route is None:
                raise HTTPError(404, f"The model '{name}' does not exist. GET /v1/models lists the models "
                                     "this key can use.", code="model_not_found", param="model")
        if not allowed(key, route):
            raise HTTPError(403, f"This API key may not use the model '{route.name}'. It may use: "
                                 f"{', '.join(key.models)}.", code="model_not_allowed", param="model")
        if route.model.mode != _MODE[op]:
            raise HTTPError(400, f"The model '{route.name}' is {_KIND[route.model.mode]} model and cannot serve "
                                 f"/{'chat/completions' if op == 'chat' else op}.", param="model",
                            code="wrong_model_type")
        return key, raw, body, route

    @staticmethod
    def _parse(raw: bytes, op: str) -> dict:
        body = parse_object(raw)
        field = _REQUIRED[op]
        val = body.get(field)
        if val is None or (op == "chat" and (type(val) is not list or not val)):
            what = "a non-empty list" if op == "chat" else "required"
            raise HTTPError(400, f"Missing required parameter: '{field}' ({what}).", param=field,
                            code="missing_required_parameter")
        if op == "chat":
            for i, m in enumerate(val):
                if type(m) is not dict or "role" not in m:
                    raise HTTPError(400, f"messages[{i}] must be an object with a 'role'.",
                                    param=f"messages[{i}]")
        return body

    # -- upstream ----------------------------------------------------------------------
    def _candidates(self, call: Call) -> list[Route]:
        """The route, then its catalog fallbacks that this key may use (a key limited to
        anthropic/* is not served by an openai/* fallback)."""
        route = call.route
        out = [route]
        for name in route.model.fallbacks:
            r = self.gw.catalog.resolve(name)
            if r is not None and r not in out and allowed(call.key, r):
                out.append(r)
        return out

    async def _call_upstream(self, call: Call, body: dict, raw: bytes) -> Response | StreamResponse:
        gw = self.gw
        candidates = self._candidates(call)
        last_err: HTTPError | None = None
        for n, route in enumerate(candidates):
            if n and call.inbound is None:
                body = orjson.loads(raw)
                apply_alias(call.route, call.op, body)
            for _ in range(_NODE_REPICKS):
                try:
                    ep, release = gw.endpoint_for(route)
                except HTTPError as e:
                    last_err = e
                    break
                try:
                    ad = adapter(route.provider.protocol)
                    # (A module's getattr with a default formats an AttributeError when it is missing.)
                    prepare = ad.__dict__.get("prepare")
                    if prepare is not None:   # e.g. Bedrock: credentials resolved off the event loop
                        await prepare(ep)
                    try:
                        if call.inbound is None:
                            ureq = ad.build(ep, route, call.op, body, call.stream)
                        else:
                            ureq = call.inbound.build(ad, ep, route, call.stream)
                    except RecursionError:
                        raise HTTPError(400, TOO_DEEP, code="invalid_json") from None
                    except TypeError as e:      # (orjson.JSONEncodeError is TypeError itself)
                        raise _build_error(e) from None
                    if route.provider.protocol in _HOP_PROTOCOLS:   # (another gateway may be behind it)
                        ureq.headers = [*ureq.headers, _HOPS[call.hops + 1]]
                    resp = await self._send(ep, route, ureq)
                except _EngineGone:
                    release()
                    last_err = gw.nodes.lost(route, ep)   # out of rotation until its node says otherwise
                    continue                              # another replica, if there is one
                except HTTPError as e:
                    release()
                    last_err = e
                    break
                except BaseException:
                    release()
                    raise
                call.served = route
                if call.stream:
                    return self._stream_response(call, resp, ad, route, ep, release)
                out = self._complete(call, resp, ad, route, ep, release, await self._read(resp, route, ep, release))
                if call.inbound is not None:
                    await call.inbound.done(call)
                return out
            if route is candidates[-1] or last_err.status not in _RETRY_STATUS:
                break
        assert last_err is not None
        raise last_err

    @staticmethod
    async def _read(resp: UpstreamResponse, route: Route, ep: Endpoint, release) -> bytes:
        try:
            return await resp.read()
        except UpstreamError as e:
            release()
            raise upstream_errors.from_transport(e, route, ep) from None

    def _complete(self, call: Call, resp: UpstreamResponse, ad, route: Route, ep: Endpoint, release,
                  data: bytes) -> Response:
        release()
        try:
            if call.inbound is None:
                obj = ad.parse(route, call.op, data)
                usage = obj.get("usage")
            else:
                data, usage = call.inbound.complete(ad, route, data)
        except Exception as e:  # noqa: BLE001
            raise HTTPError(502, f"The upstream for '{route.name}' sent a response that could not be "
                                 f"read: {scrub(str(e), ep.api_key)}", code="bad_upstream_response") from None
        cost = call.account(usage)
        headers = [(b"x-litellm-response-cost", format_cost(cost)), (b"x-request-id", call.id.encode())]
        self._extra_headers(call, route, headers)
        call.finish()
        return Response(orjson.dumps(obj) if call.inbound is None else data, 200, headers)

    async def _send(self, ep: Endpoint, route: Route, ureq) -> UpstreamResponse:
        """One upstream exchange up to the response headers, with retries while nothing was sent."""
        conf = route.provider
        t = conf.timeouts
        timeouts = Timeouts(t.connect, t.first_byte, t.read, t.total)
        attempts = conf.retry.attempts + 1
        r = conf.retry
        for attempt in range(attempts):
            resp = None
            try:
                resp = await self.gw.pool.request(ep.target, b"POST", ureq.path, ureq.headers, ureq.body, timeouts)
            except UpstreamError as e:
                if conf.local and isinstance(e, ConnectError) and "served_model" in ep.extra:
                    raise _EngineGone() from None   # a node's engine that stopped: pick another, don't wait
                if not isinstance(e, (ConnectError, ConnectTimeout, ClosedError)) or attempt + 1 >= attempts:
                    raise upstream_errors.from_transport(e, route, ep) from None
            else:
                if resp.status < 400:
                    return resp
                try:
                    data = await resp.read()
                except UpstreamError:
                    data = b""
                ra = _retry_after(resp)
                if resp.status not in _RETRY_STATUS or attempt + 1 >= attempts \
                        or resp.header("x-should-retry") == "false" or (ra is not None and ra > _RA_HOLD * r.max_backoff):
                    # Out of tries, or told to wait longer than this gateway holds a request: the client
                    # gets the upstream's retry-after and decides.
                    raise upstream_errors.from_response(
                        resp.status, data, resp.header("retry-after"),
                        adapter(route.provider.protocol).error_message(resp.status, data), route, ep)
            delay = min(r.max_backoff, r.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)
            ra = _retry_after(resp)
            if ra is not None:
                delay = max(delay, ra)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _extra_headers(call: Call, served: Route, headers: list) -> None:
        """Rate-limit headers, and which model served when a fallback did (every header costs)."""
        if served is not call.route:
            headers.append((b"x-cborg-served-by", served.name.encode()))
        if call.admission is not None:
            headers += call.admission.headers

    # -- streams -----------------------------------------------------------------------
    def _stream_response(self, call: Call, resp: UpstreamResponse, ad, route: Route, ep: Endpoint,
                         release) -> StreamResponse:
        headers = [(b"x-request-id", call.id.encode())]
        self._extra_headers(call, route, headers)

        async def finalize() -> None:
            release()
            resp.release()
            call.finish()

        return StreamResponse(self._relay(call, resp, ad, route, ep), 200, headers, on_close=finalize)

    async def _relay(self, call: Call, resp: UpstreamResponse, ad, route: Route,
                     ep: Endpoint) -> AsyncIterator[bytes]:
        inbound = call.inbound
        tr = ad.stream(route, call.op) if inbound is None else inbound.stream(ad, route, call.prompt_estimate)
        try:
            ct = (resp.header("content-type") or "").partition(";")[0].strip().lower()
            if ct in _NOT_STREAMS and not ad.__dict__.get("READS_WHOLE_ANSWERS"):
                # An upstream that ignored "stream": its whole answer would be lost or passed off as events.
                raise StreamError(f"the upstream answered a stream request with a whole response ({ct}), "
                                  "not an event stream; ask again without streaming.")
            async for data in resp.chunks():
                out = tr.feed(data)
                if out:
                    if call.ttft is None:
                        call.ttft = time.perf_counter()
                    call.chunks += len(out)
                    yield b"".join(out) if len(out) > 1 else out[0]
            out = tr.close()
            if out:
                yield b"".join(out)
            if tr.error:
                call.status = 502
                call.error = scrub(tr.error, ep.api_key)
            usage = normalize_usage(tr.usage) if tr.usage is not None else None
            call.account(usage)
            if inbound is not None:
                tail = tr.end(usage)
                await inbound.done(call, tr)   # (a stored response is readable before the client hears it ended)
                yield tail
                return
            if usage is not None and call.include_usage:
                chunk = dict(tr.template) if tr.template else {
                    "id": call.id, "object": "chat.completion.chunk" if call.op == "chat" else "text_completion",
                    "created": int(time.time()), "model": route.model.model, "choices": []}
                usage["cost"] = call.cost
                chunk["usage"] = usage
                yield data_event(orjson.dumps(chunk))
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            call.status = 499          # the client went away mid-stream
            call.error = "client disconnected during the stream"
            raise
        except Exception as e:  # noqa: BLE001 - whatever broke, the client gets an error event
            if not isinstance(e, (UpstreamError, StreamError)):
                log.exception("stream relay for %s failed", call.id)
            call.status = e.status if isinstance(e, StreamError) else 502
            call.error = scrub(str(e), ep.api_key)
            if inbound is not None:
                yield tr.fail(f"The upstream stream for '{route.name}' failed: {call.error}")
                return
            yield data_event(orjson.dumps({"error": {
                "message": f"The upstream stream for '{route.name}' failed: {call.error}",
                "type": "upstream_error", "param": None, "code": "upstream_stream_error"}}))
        finally:
            if call.usage is None and tr.usage is not None:
                # Cut short (client gone, upstream failed): account the usage reported so far,
                # with at least one output token per delivered chunk.
                u = valid_usage(normalize_usage(tr.usage), f"{route.provider_name} ({route.name})")
                if u["completion_tokens"] < call.chunks:
                    u["completion_tokens"] = call.chunks
                    u["total_tokens"] = u["prompt_tokens"] + call.chunks
                call.account(u)
