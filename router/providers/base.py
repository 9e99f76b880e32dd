"""What every provider adapter offers, and the pieces they share.

An adapter is a set of pure translations (dict in, dict out; bytes in, bytes out) between the
OpenAI schema the clients speak and one upstream protocol. No network inside: the pipeline
(router/pipeline.py) does the I/O, so adapters are tested with recorded shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson

from common.asgi import HTTPError

from ..catalog import ProviderConf, Route
from ..targets import Target


@dataclass(slots=True)
class Endpoint:
    """Where and how to reach one upstream, resolved once from models.yaml and the environment."""

    provider: str
    conf: ProviderConf
    target: Target | None
    api_key: str | None = None
    region: str | None = None
    missing: str | None = None          # why this endpoint cannot be used (no credentials, no URL)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class UpstreamRequest:
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


@runtime_checkable
class StreamTranslator(Protocol):
    """Turns upstream stream bytes into OpenAI SSE events (bytes, framed)."""

    usage: dict | None            # OpenAI usage, once the upstream reported it
    template: dict | None         # id/created/model of the stream, for the final usage chunk

    def feed(self, data: bytes) -> list[bytes]: ...
    def close(self) -> list[bytes]: ...


@runtime_checkable
class Adapter(Protocol):
    """A provider module. It may also define `async def prepare(ep)`, which the pipeline awaits before
    `build` (Bedrock resolves and refreshes AWS credentials there, off the event loop)."""

    def build(self, ep: Endpoint, route: Route, op: str, body: dict, stream: bool) -> UpstreamRequest: ...
    def parse(self, route: Route, op: str, data: bytes) -> dict: ...
    def stream(self, route: Route, op: str) -> StreamTranslator: ...
    def error_message(self, status: int, data: bytes) -> str: ...


class StreamError(Exception):
    """The upstream reported an error inside a stream that had already begun."""

    def __init__(self, message: str, status: int = 502, type: str = "api_error"):
        super().__init__(message)
        self.status = status
        self.type = type


def error_event(message: str, code: str | None = None) -> bytes:
    """An OpenAI-shaped error inside a stream that has begun (what the openai SDK raises on)."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": "upstream_error", "param": None,
                                               "code": code}}) + b"\n\n"


def bad_request(msg: str, param: str | None = None) -> HTTPError:
    """A 400 for a request an upstream protocol cannot express (said before anything is sent)."""
    return HTTPError(400, msg, param=param, code="invalid_request_error")


def data_url(value, param: str, need: str) -> tuple[str, str]:
    """(media type, base64 data) of a base64 `data:` URL, or a 400 naming `param` that says `need`
    (what the provider wants instead): providers that take media inline all read them this way."""
    if type(value) is not str or not value.startswith("data:"):
        raise bad_request(f"{param}: {need} (data:<type>;base64,...).", param)
    head, sep, data = value.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad_request(f"{param}: a data URL must be base64 (data:<type>;base64,...).", param)
    return head[5:-7], data


def image_url(part: dict) -> object:
    """The URL of an OpenAI image_url part (the object form or a bare string), unchecked."""
    iu = part.get("image_url")
    return iu.get("url") if type(iu) is dict else iu


def file_data(part: dict, param: str) -> tuple[str, str]:
    """(media type, base64 data) of an OpenAI file part, which these providers take inline only."""
    f = part.get("file")
    return data_url(f.get("file_data") if type(f) is dict else None, param,
                    "file parts need file.file_data as a data: URL")


def tool_call(call, param: str) -> tuple[str, dict]:
    """(name, arguments) of an assistant message's OpenAI tool call, for providers that want the
    arguments as an object: a 400 naming `param` when the name is missing or they are not a JSON object."""
    fn = call.get("function") if type(call) is dict else None
    name = fn.get("name") if type(fn) is dict else None
    if type(name) is not str or not name:
        raise bad_request(f"{param}.function.name is required.", param)
    raw = fn.get("arguments") or "{}"
    try:
        args = orjson.loads(raw) if type(raw) is str else raw
    except orjson.JSONDecodeError:
        raise bad_request(f"{param}.function.arguments is not valid JSON.", param) from None
    if type(args) is not dict:
        raise bad_request(f"{param}.function.arguments must be a JSON object.", param)
    return name, args


JSON_TOOL = "json_tool_call"   # the forced tool that carries response_format where a provider has no JSON mode


def function_tools(body: dict) -> list[tuple[int, dict]]:
    """The caller's `tools` as (index, function), checked to be OpenAI function tools."""
    tools = body.get("tools")
    if not tools:
        return []
    if type(tools) is not list:
        raise bad_request("tools must be a list.", "tools")
    out = []
    for k, t in enumerate(tools):
        fn = t.get("function") if type(t) is dict else None
        if type(t) is not dict or t.get("type", "function") != "function" or type(fn) is not dict or not fn.get("name"):
            raise bad_request(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ...}}}}.",
                              f"tools[{k}]")
        if fn["name"] == JSON_TOOL:
            raise bad_request(f"tools[{k}]: the name {JSON_TOOL!r} is reserved by the gateway (it carries "
                              "response_format to providers without a JSON mode).", f"tools[{k}]")
        out.append((k, fn))
    return out


def json_format(body: dict) -> dict | None:
    """The JSON Schema a JSON `response_format` asks for ({"type": "object"} for json_object);
    None for text or no response_format; a 400 for a malformed one."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if type(rf) is dict else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if type(js) is dict else None
        if type(schema) is not dict:
            raise bad_request("response_format.json_schema.schema must be a JSON Schema object.", "response_format")
        return schema
    raise bad_request("response_format.type must be 'text', 'json_object' or 'json_schema'.", "response_format")


def json_tool_check(route_name: str, body: dict, schema: dict) -> None:
    """What a response_format carried by a forced tool cannot be combined with."""
    if schema.get("type") != "object":
        raise bad_request(f"response_format for '{route_name}' is given to the model as a tool's input, which must "
                          "be a JSON object: the schema's root needs \"type\": \"object\".", "response_format")
    if body.get("tools") and body.get("tool_choice") != "none":
        raise bad_request(f"'{route_name}' takes response_format through a forced tool, so it cannot be combined "
                          "with tools the model may call; leave one of them out.", "response_format")


def cached_usage(inp: int, read: int, write: int, out: int) -> dict:
    """OpenAI usage from a provider that counts cache reads and writes apart from other input
    (Anthropic, Bedrock): prompt_tokens includes both, cached_tokens is the reads."""
    prompt = inp + read + write
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": read},
            "cache_creation_input_tokens": write, "cache_read_input_tokens": read}


def normalize_usage(usage: dict | None) -> dict:
    """OpenAI usage with the fields clients index without checking always present.

    `prompt_tokens_details.cached_tokens` is 0 when nothing was cached: the CBorg prompt-caching
    example reads it unconditionally.
    Counts are not checked here (a number of the wrong type or size is kept as it came): the
    pipeline checks every call's usage once, naming the upstream (router/accounting/usage.py).
    """
    u = dict(usage) if type(usage) is dict else {}     # (a list or a string from an odd upstream: none)
    p = u["prompt_tokens"] = u.get("prompt_tokens") or 0
    c = u["completion_tokens"] = u.get("completion_tokens") or 0
    if not u.get("total_tokens"):
        u["total_tokens"] = p + c if type(p) is int and type(c) is int else 0
    ptd = u.get("prompt_tokens_details")
    ptd = dict(ptd) if isinstance(ptd, dict) else {}
    ptd["cached_tokens"] = ptd.get("cached_tokens") or 0
    u["prompt_tokens_details"] = ptd
    return u


_SECRETISH = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|A[KS]IA[0-9A-Z]{12,}|AIza[0-9A-Za-z_\-]{20,}|xai-[A-Za-z0-9]{8,})")


def scrub(text: str, *secrets: str | None) -> str:
    """Remove credentials from a message meant for a client or a log."""
    for s in secrets:
        if s and len(s) >= 6:
            text = text.replace(s, "***")
    return _SECRETISH.sub("***", text)


def error_text(data: bytes, limit: int = 500) -> str:
    """The message of an upstream error body in any of the usual shapes, else its text."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data[:limit].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("Message") or err.get("detail")
            if msg:
                return str(msg)[:limit]
        elif isinstance(err, str):
            return err[:limit]
        for k in ("message", "Message", "detail"):
            if obj.get(k):
                return str(obj[k])[:limit]
    return data[:limit].decode("utf-8", "replace")


EMPTY_TEXT = "(empty)"   # the text of a user turn that has none: the APIs refuse blank text, OpenAI takes it


class ToolCallChunks:
    """OpenAI chat.completion.chunk events for translators whose upstream streams content blocks
    (Anthropic, Bedrock). Subclasses hold `_head` (the chunk prefix: id, object, created, model),
    `_tools` (block index -> OpenAI tool_calls index), `_argless` (tool blocks with no argument
    piece yet) and `_json` (blocks of the JSON_TOOL, whose input streams as content). Tool calls are numbered in order and their arguments streamed as they come; a call
    that got none is closed with "{}", as the non-streamed answer gives it (json.loads("") fails)."""

    __slots__ = ()

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return (b"data: " + self._head + b'"choices":[{"index":0,"delta":' + delta
                + b',"logprobs":null,"finish_reason":' + finish + b"}]}\n\n")

    def _arguments(self, k: int, piece: str) -> bytes:
        return self._chunk(b'{"tool_calls":[{"index":%d,"function":{"arguments":' % k + orjson.dumps(piece)
                           + b"}}]}")

    def _tool_start(self, i, call_id, name, out: list[bytes]) -> None:
        self._argless.add(i)
        if name == JSON_TOOL:          # response_format carried by a forced tool: its input is the content
            self._json.add(i)
            return
        k = self._tools[i] = len(self._tools)
        head = {"index": k, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        out.append(self._chunk(b'{"tool_calls":[' + orjson.dumps(head) + b"]}"))

    def _tool_piece(self, i, piece: str | None, out: list[bytes]) -> None:
        if not piece:
            return
        if i in self._json:
            self._argless.discard(i)
            out.append(self._chunk(b'{"content":' + orjson.dumps(piece) + b"}"))
            return
        k = self._tools.get(i)
        if k is not None:
            self._argless.discard(i)
            out.append(self._arguments(k, piece))

    def _block_stop(self, i, out: list[bytes]) -> None:
        if i in self._argless:
            self._argless.discard(i)
            if i in self._json:
                out.append(self._chunk(b'{"content":"{}"}'))
            else:
                out.append(self._arguments(self._tools[i], "{}"))

    def _finish_reason(self, finish: str) -> str:
        """A forced JSON tool's call is the answer, not a tool call."""
        return "stop" if finish == "tool_calls" and self._json and not self._tools else finish


class SSETranslator:
    """Base of the translators whose upstream streams SSE (Anthropic, Gemini, OpenAI): frames the events,
    hands each to `_event`, and relays nothing after an error (a broken event becomes one)."""

    __slots__ = ()
    provider = "upstream"

    def _event(self, raw: bytes, out: list[bytes]) -> None:
        raise NotImplementedError

    def _events(self, raws: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for raw in raws:
            if self.error:
                break   # after an error event nothing more is relayed
            try:
                self._event(raw, out)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self.error = f"unreadable stream event: {e}"
                out.append(error_event(f"The {self.provider} stream sent an event that could not be read: {e}",
                                       "bad_upstream_response"))
        return out

    def feed(self, data: bytes) -> list[bytes]:
        return self._events(self._sse.feed(data))

    def close(self) -> list[bytes]:
        return self._events(self._sse.flush())
