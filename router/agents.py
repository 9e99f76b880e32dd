"""Requests in the coding agents' API shapes, carried through the pipeline (router/pipeline.py).

An `Inbound` is made per request by its route (router/api/agents.py) and handed to `Pipeline.handle`:
it parses the body, and for each candidate model (the one asked for, then its fallbacks) builds the
upstream request, then turns the upstream's answer back into its own shape:
- native pass-through when the model's provider speaks the dialect (anthropic/* on /v1/messages,
  providers with `native_responses` on /v1/responses): the body as sent (unknown fields, `anthropic-beta`
  included) but for the model's upstream name, an alias's system prompt and parameter defaults; the
  usage read from the answer for accounting;
- otherwise translation through the internal chat form (router/dialects/) and the provider's adapter.
Responses made with `store` are kept (router/stored_responses.py: written after the reply) for
`previous_response_id` and GET/DELETE, for the key that made them alone.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from common.asgi import HTTPError

from .accounting.usage import valid_usage
from .catalog import Route
from .dialects import anthropic_messages as am
from .dialects import openai_responses as ro
from .pipeline import apply_alias, apply_defaults, parse_object
from .providers.base import Endpoint, UpstreamRequest
from .store.base import ResponseRecord

if TYPE_CHECKING:
    from .app import Gateway
    from .pipeline import Call
    from .store.base import KeyRecord

log = logging.getLogger("cborg.agents")


class Inbound:
    """What the pipeline asks of a request in another API's shape."""

    endpoint = ""           # its name in the ledger

    def __init__(self, gw: "Gateway", headers: dict[bytes, bytes]):
        self.gw = gw
        self.headers = headers
        self.body: dict = {}

    def parse(self, raw: bytes) -> dict:
        """The body, checked as the API itself checks it (400s in its words)."""
        raise NotImplementedError

    async def prepare(self, key: "KeyRecord", route: Route) -> None:
        """What needs the caller and the store before admission (e.g. a previous response)."""

    def native(self, route: Route) -> bool:
        raise NotImplementedError

    def build(self, ad, ep: Endpoint, route: Route, stream: bool) -> UpstreamRequest:
        raise NotImplementedError

    def complete(self, ad, route: Route, data: bytes) -> tuple[bytes, dict | None]:
        """The client's body and the OpenAI-form usage of a whole upstream answer."""
        raise NotImplementedError

    def stream(self, ad, route: Route, estimate: int):
        """A stream translator that also has `end(usage) -> bytes` and `fail(message) -> bytes`."""
        raise NotImplementedError

    async def done(self, call: "Call", tr=None) -> None:
        """After the answer (before a stream's last event): keep what must be kept (without waiting for it
        to be written)."""


class MessagesCall(Inbound):
    """POST /v1/messages."""

    endpoint = "messages"

    def parse(self, raw: bytes) -> dict:
        self.body = parse_object(raw)
        am.check(self.body)
        return self.body

    def native(self, route: Route) -> bool:
        return route.provider.protocol == "anthropic"

    def build(self, ad, ep: Endpoint, route: Route, stream: bool) -> UpstreamRequest:
        if self.native(route):
            body = dict(self.body)
            apply_defaults(route, body)
            if route.system_prompt:
                am.with_system(body, route.system_prompt)
            return ad.native(ep, route, "/v1/messages", body, self.headers)
        chat = am.to_chat(self.body, route.model)
        apply_alias(route, "chat", chat)
        return ad.build(ep, route, "chat", chat, stream)

    def complete(self, ad, route: Route, data: bytes) -> tuple[bytes, dict | None]:
        if self.native(route):
            obj = orjson.loads(data)
            if type(obj) is not dict or obj.get("type") != "message":
                raise ValueError("upstream response is not an Anthropic message")
            return data, am.usage_in(obj.get("usage"))
        chat = ad.parse(route, "chat", data)
        return orjson.dumps(am.from_chat(checked_usage(chat, route))), chat.get("usage")

    def stream(self, ad, route: Route, estimate: int):
        if self.native(route):
            return am.NativeStream()
        return am.MessagesStream(ad.stream(route, "chat"), route.model.model, estimate)


def checked_usage(chat: dict, route: Route) -> dict:
    """A chat completion whose usage is checked (in place) as the accounting checks it, before a dialect
    shows it: the client is told what is billed. (The accounting's check of the same dict then finds
    nothing to change.)"""
    u = chat.get("usage")
    if type(u) is dict:
        valid_usage(u, f"{route.provider_name} ({route.name})")
    elif u is not None:
        chat["usage"] = None
    return chat


def _not_found(rid: str, param: str | None = None) -> HTTPError:
    what = "Previous response" if param else "Response"
    return HTTPError(404, f"{what} with id '{rid}' not found.", param=param, code="not_found" if not param else
                     "previous_response_not_found")


async def owned_response(gw: "Gateway", key: "KeyRecord", rid: str, param: str | None = None) -> ResponseRecord:
    """A stored response of this key, within the retention period; 404 otherwise (whoever else made it)."""
    rec = await gw.responses.get(rid) if rid else None
    if rec is None or rec.key_id != key.id or rec.created_at < time.time() - gw.catalog.conf.responses.retention_s:
        raise _not_found(rid, param)
    return rec


class ResponsesCall(Inbound):
    """POST /v1/responses (and /v1/responses/compact, which only upstreams that have it serve)."""

    endpoint = "responses"

    def __init__(self, gw: "Gateway", headers: dict[bytes, bytes], compact: bool = False):
        super().__init__(gw, headers)
        self.compact = compact
        if compact:
            self.endpoint = "responses/compact"
        self.rid = ro.new_id("resp")
        self.key: "KeyRecord | None" = None
        self.history: list[dict] = []     # the input and output of the previous response, if one is named
        self.prev_native = False          # the previous response is stored by the upstream
        self.final: dict | None = None    # the translated Response, to store
        self.final_json = b""             # ... as the client got it
        self.native_id: str | None = None

    def parse(self, raw: bytes) -> dict:
        self.body = parse_object(raw)
        ro.check(self.body)
        return self.body

    async def prepare(self, key: "KeyRecord", route: Route) -> None:
        self.key = key
        prev = self.body.get("previous_response_id")
        if prev:
            rec = await owned_response(self.gw, key, prev, "previous_response_id")
            if rec.native:
                self.prev_native = True
            else:
                data = rec.content()
                self.history = [*data["input"], *data["response"]["output"]]

    def native(self, route: Route) -> bool:
        return route.provider.native_responses

    def build(self, ad, ep: Endpoint, route: Route, stream: bool) -> UpstreamRequest:
        body = dict(self.body)
        apply_defaults(route, body)
        if self.native(route):
            if route.system_prompt:
                ro.with_instructions(body, route.system_prompt)
            if self.history:   # continued from a response kept here: the upstream gets the whole conversation
                body.pop("previous_response_id", None)
                body["input"] = [*self.history, *ro.input_items(body)]
            return ad.native(ep, route, "/responses/compact" if self.compact else "/responses", body)
        if self.compact:
            raise HTTPError(404, f"/v1/responses/compact is not available for '{route.name}': only models whose "
                                 "provider has it (openai/*) compact a conversation.", code="not_found", param="model")
        if self.prev_native:
            raise HTTPError(400, f"previous_response_id names a response kept by OpenAI, which '{route.name}' "
                                 "cannot read: continue with an openai/* model, or send the conversation as input.",
                            param="previous_response_id")
        chat = ro.to_chat(body, route.model, [*self.history, *ro.input_items(body)])
        apply_alias(route, "chat", chat)
        return ad.build(ep, route, "chat", chat, stream)

    def complete(self, ad, route: Route, data: bytes) -> tuple[bytes, dict | None]:
        if self.native(route):
            obj = orjson.loads(data)
            if type(obj) is not dict:
                raise ValueError("upstream response is not a JSON object")
            self.native_id = obj.get("id") if obj.get("object") == "response" else None
            return data, ro.usage_in(obj.get("usage"))
        chat = ad.parse(route, "chat", data)
        self.final = ro.from_chat(checked_usage(chat, route), self.body, self.rid)
        self.final_json = orjson.dumps(self.final)
        return self.final_json, chat.get("usage")

    def stream(self, ad, route: Route, estimate: int):
        if self.native(route):
            return ro.NativeStream()
        return ro.ResponsesStream(ad.stream(route, "chat"), self.body, self.rid, route.model.model)

    async def done(self, call: "Call", tr=None) -> None:
        if self.body.get("store") is False or self.compact or self.key is None:
            return
        route = call.served
        if self.native(route):
            rid = tr.rid if tr is not None else self.native_id
            rec = ResponseRecord(rid, self.key.id, route.name, True) if rid else None
        else:
            final = tr.final if tr is not None else self.final
            rec = None
            if final is not None and final["status"] != "failed":
                items = [*self.history, *({"id": ro.new_id("msg"), **x} if "id" not in x else x
                                          for x in ro.input_items(self.body))]
                data = b'{"response":' + (orjson.dumps(final) if tr is not None else self.final_json) + \
                    b',"input":' + orjson.dumps(items) + b"}"
                rec = ResponseRecord(final["id"], self.key.id, route.name, False, data)
        if rec is not None:
            self.gw.responses.put(rec)


async def purge_responses(gw: "Gateway", every_s: float = 3600.0) -> None:
    """Delete stored responses past the retention period, now and then (reads already ignore them)."""
    while True:
        try:
            n = await gw.store.purge_responses(time.time() - gw.catalog.conf.responses.retention_s)
            if n:
                log.info("deleted %d stored responses past their retention", n)
        except Exception as e:  # noqa: BLE001 - try again next time
            log.warning("purging stored responses failed: %s", e)
        await asyncio.sleep(every_s)


def anthropic_model(gw: "Gateway", name: str) -> dict[str, Any]:
    """A model in the Anthropic list shape (Claude Code's /v1/models, sent with anthropic-version)."""
    return {"type": "model", "id": name, "display_name": name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(gw.started_at))}
