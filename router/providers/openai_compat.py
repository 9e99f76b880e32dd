"""OpenAI-compatible upstreams: OpenAI, xAI, vLLM and CBorg's own engines.

The request passes through untouched but for the model name, the alias defaults, the usage
request on streams, and what OpenAI's own models require (reasoning models take
`max_completion_tokens` and no sampling parameters; `reasoning_effort` goes only to models that
take it, per the catalog; `cache_control`, on messages, content parts or tools, is an Anthropic
field that OpenAI rejects), and embedding inputs given as token arrays decoded to text for upstreams
other than OpenAI's own (token_arrays.py). Stream events are forwarded byte for byte; only the usage chunk is
held back, so the pipeline can add the cost to it or drop it when the client did not ask for
usage. An event that cannot be read ends the relay with an error event, as in the other adapters.
"""
from __future__ import annotations

import orjson

from ..catalog import Route
from ..sse import SSESplitter, parse_event
from .base import Endpoint, SSETranslator, UpstreamRequest, bad_request, error_text, normalize_usage, scrub
from .token_arrays import decode, is_token_input

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}

# Sampling parameters OpenAI's reasoning models (o1, o1-mini, o3-mini) reject.
_REASONING_DROP = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs",
                   "top_logprobs", "logit_bias")


def _strip_cache_control(body: dict) -> None:
    """Anthropic-style clients mark messages, content parts and tools with cache_control."""
    for key in ("messages", "tools"):
        items = body.get(key)
        for m in items if type(items) is list else ():
            if type(m) is dict:
                m.pop("cache_control", None)
                content = m.get("content")
                if type(content) is list:
                    for part in content:
                        if type(part) is dict:
                            part.pop("cache_control", None)


def _inline_images_only(body: dict) -> None:
    """Images for the lab's own engines come inline: an engine (vLLM) would fetch an http(s) URL
    from inside the lab, for whoever sent it (as Gemini and Bedrock, which take no URL either)."""
    msgs = body.get("messages")
    for i, m in enumerate(msgs if type(msgs) is list else ()):
        content = m.get("content") if type(m) is dict else None
        for j, part in enumerate(content if type(content) is list else ()):
            if type(part) is dict and part.get("type") == "image_url":
                iu = part.get("image_url")
                url = iu.get("url") if type(iu) is dict else iu
                if type(url) is not str or not url.startswith("data:"):
                    raise bad_request(f"messages[{i}].content[{j}]: local models take images inline: send "
                                      "image_url.url as a data: URL (data:image/png;base64,...); the lab's "
                                      "engines do not fetch URLs.", f"messages[{i}].content[{j}]")


def _for_openai_model(route: Route, body: dict) -> None:
    """What OpenAI's API requires of particular models."""
    m = route.model
    takes_effort = m.supports_reasoning if m.supports_reasoning_effort is None else m.supports_reasoning_effort
    if not takes_effort:
        body.pop("reasoning_effort", None)
    if m.supports_reasoning and route.provider_name == "openai":
        if "max_tokens" in body:
            mt = body.pop("max_tokens")
            body.setdefault("max_completion_tokens", mt)
        for k in _REASONING_DROP:
            body.pop(k, None)
    if not m.supports_system_messages:
        msgs = body.get("messages")
        if type(msgs) is list:
            body["messages"] = [({**x, "role": "user"} if type(x) is dict and x.get("role") in ("system", "developer")
                                 else x) for x in msgs]


def build_body(route: Route, op: str, body: dict, stream: bool) -> dict:
    """The upstream body (mutates and returns `body`, which the pipeline owns)."""
    body["model"] = route.model.model
    if op == "chat":
        _strip_cache_control(body)
        _for_openai_model(route, body)
        if route.provider.local and route.model.supports_vision:
            _inline_images_only(body)
    elif op == "embeddings" and not route.provider.takes_token_ids and is_token_input(body.get("input")):
        body["input"] = decode(body["input"])
    if stream:
        so = body.get("stream_options")
        body["stream_options"] = {**so, "include_usage": True} if type(so) is dict else {"include_usage": True}
    return body


def headers_for(ep: Endpoint) -> list[tuple[bytes, bytes]]:
    """The upstream's headers (credentials, configured extras, loop-detection id), made once per endpoint."""
    headers = ep.extra.get("headers")
    if headers is None:
        headers = [(b"content-type", b"application/json")]
        if ep.api_key:
            headers.append((b"authorization", b"Bearer " + ep.api_key.encode()))
        for k, v in ep.conf.headers.items():
            headers.append((k.lower().encode(), v.encode()))
        if ep.extra.get("via"):   # the gateway's loop-detection id (router/app.py)
            headers.append((b"x-cborg-via", ep.extra["via"]))
        ep.extra["headers"] = headers
    return headers


def build(ep: Endpoint, route: Route, op: str, body: dict, stream: bool) -> UpstreamRequest:
    body = build_body(route, op, body, stream)
    served = ep.extra.get("served_model")
    if served:   # a CBorg inference node's engine: the name it serves the model under
        body["model"] = served
    return UpstreamRequest(PATHS[op], headers_for(ep), orjson.dumps(body))


def native(ep: Endpoint, route: Route, path: str, body: dict) -> UpstreamRequest:
    """A request in the upstream's own shape (a Responses request to OpenAI), passed through as sent but
    for the model's upstream name."""
    body["model"] = ep.extra.get("served_model") or route.model.model
    return UpstreamRequest(path, headers_for(ep), orjson.dumps(body))


def parse(route: Route, op: str, data: bytes) -> dict:
    obj = orjson.loads(data)
    if type(obj) is not dict:
        raise ValueError("upstream response is not a JSON object")
    obj["usage"] = normalize_usage(obj.get("usage"))
    return obj


class PassthroughStream(SSETranslator):
    """Forwards events as they are; keeps the usage chunk for the pipeline; drops [DONE]."""

    provider = "OpenAI-compatible"
    __slots__ = ("_sse", "usage", "template", "error")

    def __init__(self) -> None:
        self._sse = SSESplitter()
        self.usage: dict | None = None
        self.template: dict | None = None
        self.error: str | None = None

    def _event(self, raw: bytes, out: list[bytes]) -> None:
        if raw[:6] == b"data: " and b"\n" not in raw:
            payload = raw[6:]
        else:
            _, payload = parse_event(raw)
            if not payload:
                return  # comment or keep-alive
            raw = b"data: " + payload
        if payload == b"[DONE]":
            return
        if b'"usage"' in payload or b'"error"' in payload:
            obj = orjson.loads(payload)
            if type(obj) is dict:
                u = obj.get("usage")
                if u:
                    if type(u) is dict:    # (anything else is no usage: the pipeline counts what was delivered)
                        self.usage = u
                    if not obj.get("choices"):
                        self.template = obj
                        return
                err = obj.get("error")
                if err and "choices" not in obj:
                    self.error = scrub(str((err.get("message") if type(err) is dict else None) or err))
        out.append(raw + b"\n\n")


def stream(route: Route, op: str) -> PassthroughStream:
    return PassthroughStream()


def error_message(status: int, data: bytes) -> str:
    return error_text(data)
