"""Anthropic Messages (`POST /v1/messages`) <-> the internal chat form (OpenAI chat), for models whose
provider does not speak Messages itself (openai/*, xai/*, google/*, aws/*, lbl/*).

Request (`to_chat`): `system` (a string or blocks) and mid-conversation `system` turns become system
messages; text, image (base64 or URL) and PDF document blocks become content parts, `cache_control`
kept where it was (the outbound providers keep, map or strip it); `tool_use` blocks become the
assistant's `tool_calls`, `tool_result` blocks become `tool` messages (placed first, as OpenAI
wants them right after the call); `stop_sequences` -> `stop`; `tool_choice` and
`disable_parallel_tool_use` map; `thinking` / `output_config.effort` become `reasoning_effort` where
the model reasons, and `output_config.format` a JSON-schema `response_format`. `max_tokens` is held to
the model's maximum output (Claude Code asks 32,000 of every model). What has no counterpart
(server tools, `context_management`, `metadata`, `top_k`, thinking blocks sent back, a field a new
release adds) is dropped with a debug log, never refused.

Response (`from_chat`) and stream (`MessagesStream`): a chat completion or chunk stream -> a Message
or the full event sequence (message_start with the input count known so far, content_block_start /
delta / stop for text and tool_use with input_json_delta, ping, message_delta with the final
cumulative usage, message_stop). Usage in Anthropic's convention: `input_tokens` excludes cache reads
and writes, which are reported apart.
"""
from __future__ import annotations

import logging
import os

import orjson

from common.asgi import HTTPError

from ..catalog import ModelConf
from ..providers.base import cached_usage
from ..sse import parse_event
from . import ChunkEvents, NativeRelay, _details, count

log = logging.getLogger("cborg.dialects")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
        "content_filter": "refusal"}
_EFFORT = {"low": "low", "medium": "medium", "high": "high", "max": "high", "minimal": "low"}
# Known request fields with no chat counterpart: dropped quietly (anything else unknown: debug log).
_DROP = {"metadata", "context_management", "service_tier", "container", "mcp_servers", "top_k"}


def error_body(status: int, message: str) -> bytes:
    """Anthropic's error shape, with the type its API gives that status."""
    typ = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": typ, "message": message}})


def _bad(message: str) -> HTTPError:
    return HTTPError(400, message, code="invalid_request_error")


def check(body: dict) -> None:
    """What the Messages API itself requires, as its own 400 says it (the model is checked by the pipeline)."""
    mt = body.get("max_tokens")
    if mt is None:
        raise _bad("max_tokens: Field required")
    if type(mt) is not int or mt < 1:
        raise _bad("max_tokens: Input should be a valid integer greater than or equal to 1")
    msgs = body.get("messages")
    if type(msgs) is not list or not msgs:
        raise _bad("messages: Field required (a non-empty list)")
    for i, m in enumerate(msgs):
        if type(m) is not dict or m.get("role") not in ("user", "assistant", "system"):
            raise _bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        c = m.get("content")
        if type(c) is not str and type(c) is not list:
            raise _bad(f"messages.{i}.content: Input should be a valid string or list")
    s = body.get("system")
    if s is not None and type(s) is not str and type(s) is not list:
        raise _bad("system: Input should be a valid string or list")
    tools = body.get("tools")
    if tools is not None:
        if type(tools) is not list:
            raise _bad("tools: Input should be a valid list")
        for k, t in enumerate(tools):
            if type(t) is not dict:
                raise _bad(f"tools.{k}: Input should be a valid dictionary")
    for k in _OBJECTS:
        v = body.get(k)
        if v is not None and type(v) is not dict:
            raise _bad(f"{k}: Input should be a valid dictionary")
    th = body.get("thinking")
    if th is not None and th.get("budget_tokens") is not None and type(th["budget_tokens"]) is not int:
        raise _bad("thinking.budget_tokens: Input should be a valid integer")
    for k in ("temperature", "top_p"):
        v = body.get(k)
        if v is not None and type(v) is not float and type(v) is not int:
            raise _bad(f"{k}: Input should be a valid number")


_OBJECTS = ("tool_choice", "thinking", "output_config", "metadata")
_TEXTS = (str, list, type(None))


def _blocks_ok(blocks: list) -> bool:
    """Content blocks are objects with a string `type`, and the fields the translation reads have the
    types it reads them as (a source an object, a tool result's content a string or blocks). The fast
    pass, plain type checks (Claude Code sends hundreds of blocks); `_check_blocks` names what is wrong."""
    for b in blocks:
        if type(b) is not dict:
            return False
        t = b.get("type")
        if t == "text" or t == "tool_use":      # the common blocks: nothing more is read by type
            continue
        if type(t) is not str:
            return False
        src = b.get("source")
        if src is not None and (type(src) is not dict
                                or src.get("type") == "content" and type(src.get("content")) not in _TEXTS):
            return False
        if t == "tool_result":
            c = b.get("content")
            if c is not None and type(c) is not str and (type(c) is not list or not _blocks_ok(c)):
                return False
    return True


def check_blocks(body: dict) -> None:
    """The content blocks of a request `check` passed, for what reads them (the translation, count_tokens);
    a native pass-through leaves them to Anthropic, sparing Claude Code's long conversations the walk."""
    for i, m in enumerate(body["messages"]):
        c = m["content"]
        if type(c) is list and not _blocks_ok(c):
            _check_blocks(c, f"messages.{i}.content")
    s = body.get("system")
    if type(s) is list and not _blocks_ok(s):
        _check_blocks(s, "system")


def _check_blocks(blocks: list, where: str) -> None:
    """The 400 naming the first block `_blocks_ok` refuses, Anthropic's way (messages.0.content.1.source)."""
    for j, b in enumerate(blocks):
        if type(b) is not dict:
            raise _bad(f"{where}.{j}: Input should be a valid dictionary")
        t = b.get("type")
        if t == "text" or t == "tool_use":
            continue
        if type(t) is not str:
            raise _bad(f"{where}.{j}.type: Field required (a string)")
        src = b.get("source")
        if src is not None:
            if type(src) is not dict:
                raise _bad(f"{where}.{j}.source: Input should be a valid dictionary")
            if src.get("type") == "content" and type(src.get("content")) not in _TEXTS:
                raise _bad(f"{where}.{j}.source.content: Input should be a valid string or list")
        if t == "tool_result":
            c = b.get("content")
            if type(c) is list:
                _check_blocks(c, f"{where}.{j}.content")
            elif c is not None and type(c) is not str:
                raise _bad(f"{where}.{j}.content: Input should be a valid string or list")


def with_system(body: dict, prompt: str) -> None:
    """An alias's system prompt before the caller's `system` (native pass-through)."""
    s = body.get("system")
    if not s:
        body["system"] = prompt
    elif type(s) is str:
        body["system"] = prompt + "\n\n" + s
    elif type(s) is list:
        body["system"] = [{"type": "text", "text": prompt}, *s]


# -- request --------------------------------------------------------------------------------------
def _part(b: dict) -> dict | None:
    """A text, image or document block -> a chat content part (None: nothing to send)."""
    t = b.get("type")
    part: dict | None = None
    if t == "text":
        text = b.get("text")
        if type(text) is str and text:
            part = {"type": "text", "text": text}
    elif t == "image":
        src = b.get("source")
        src = src if type(src) is dict else {}      # (checked by `check`; a stray caller gets nothing)
        if src.get("type") == "base64":
            part = {"type": "image_url", "image_url": {"url": f"data:{src.get('media_type')};base64,{src.get('data')}"}}
        elif src.get("type") == "url":
            part = {"type": "image_url", "image_url": {"url": src.get("url")}}
    elif t == "document":
        src = b.get("source")
        src = src if type(src) is dict else {}
        if src.get("type") == "base64":
            part = {"type": "file", "file": {"filename": b.get("title") or "document.pdf",
                                             "file_data": f"data:{src.get('media_type')};base64,{src.get('data')}"}}
        elif src.get("type") == "text":
            part = {"type": "text", "text": src.get("data") or ""}
        elif src.get("type") == "content":
            inner = src.get("content")
            text = inner if type(inner) is str else "\n".join(
                x.get("text") or "" for x in (inner if type(inner) is list else ())
                if type(x) is dict and x.get("type") == "text" and type(x.get("text")) is str)
            part = {"type": "text", "text": text}
    if part is None:
        log.debug("anthropic_messages: %s block dropped (no chat counterpart)", t)
        return None
    cc = b.get("cache_control")
    if cc:
        part["cache_control"] = cc
    return part


def _content(parts: list[dict]):
    """Parts as a plain string when they are one unmarked text (what every upstream takes)."""
    if len(parts) == 1 and parts[0]["type"] == "text" and "cache_control" not in parts[0]:
        return parts[0]["text"]
    return parts


def _tool_result(b: dict, out: list, images: list) -> None:
    c = b.get("content")
    if type(c) is list:
        texts = []
        for x in c:
            p = _part(x) if type(x) is dict else None
            if p is None:
                continue
            if p["type"] == "text":
                texts.append(p["text"])
            else:
                images.append(p)      # a tool message carries text only: images follow in a user turn
        c = "\n".join(texts)
    elif type(c) is not str:
        c = ""
    if b.get("is_error") and c:
        c = "Error: " + c
    m = {"role": "tool", "tool_call_id": b.get("tool_use_id") or "", "content": c}
    if b.get("cache_control"):
        m["cache_control"] = b["cache_control"]
    out.append(m)


def _messages(body: dict) -> list[dict]:
    out: list[dict] = []
    s = body.get("system")
    if type(s) is str and s:
        out.append({"role": "system", "content": s})
    elif type(s) is list:
        parts = [p for p in (_part(b) for b in s if type(b) is dict) if p]
        if parts:
            out.append({"role": "system", "content": _content(parts)})
    for m in body["messages"]:
        role, c = m["role"], m.get("content")
        blocks = [{"type": "text", "text": c}] if type(c) is str else c
        if role == "assistant":
            parts, calls = [], []
            for b in blocks:
                if type(b) is not dict:
                    continue
                if b.get("type") == "tool_use":
                    calls.append({"id": b.get("id"), "type": "function", "function": {
                        "name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}})
                elif b.get("type") in ("thinking", "redacted_thinking"):
                    continue     # signed for Anthropic models only
                else:
                    p = _part(b)
                    if p is not None and p["type"] == "text":
                        parts.append(p)
            msg: dict = {"role": "assistant", "content": "".join(p["text"] for p in parts) or None}
            if calls:
                msg["tool_calls"] = calls
            if msg["content"] is not None or calls:
                out.append(msg)
            continue
        parts, images = [], []
        for b in blocks:
            if type(b) is not dict:
                continue
            if b.get("type") == "tool_result":
                _tool_result(b, out, images)
            else:
                p = _part(b)
                if p is not None:
                    parts.append(p)
        parts += images
        if parts:
            out.append({"role": role, "content": _content(parts)})
    return out


def _tools(body: dict, chat: dict) -> None:
    tools = []
    for t in body.get("tools") or ():
        if type(t) is not dict or not t.get("name") or t.get("type") not in (None, "custom"):
            log.debug("anthropic_messages: tool %r dropped (server tools have no chat counterpart)",
                      t.get("type") if type(t) is dict else t)
            continue
        fn = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
        if t.get("description"):
            fn["description"] = t["description"]
        tool: dict = {"type": "function", "function": fn}
        if t.get("cache_control"):
            tool["cache_control"] = t["cache_control"]
        tools.append(tool)
    if not tools:
        return
    chat["tools"] = tools
    tc = body.get("tool_choice")
    if type(tc) is dict:
        kind = tc.get("type")
        if kind == "any":
            chat["tool_choice"] = "required"
        elif kind == "none":
            chat["tool_choice"] = "none"
        elif kind == "tool" and tc.get("name"):
            chat["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
        if tc.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False


def _reasoning(body: dict, model: ModelConf, chat: dict) -> None:
    """thinking / output_config.effort -> reasoning_effort, for models that take it (else dropped)."""
    takes = model.supports_reasoning if model.supports_reasoning_effort is None else model.supports_reasoning_effort
    oc = body.get("output_config")
    effort = oc.get("effort") if type(oc) is dict else None
    th = body.get("thinking")
    if effort is None and type(th) is dict and th.get("type") == "enabled":
        budget = th.get("budget_tokens") or 0
        effort = "low" if budget < 2048 else "medium" if budget < 8192 else "high"
    if type(th) is dict and th.get("type") == "disabled":
        effort = None
    if type(effort) is str and effort in _EFFORT and takes:
        chat["reasoning_effort"] = _EFFORT[effort]
    fmt = oc.get("format") if type(oc) is dict else None
    if type(fmt) is dict and fmt.get("type") == "json_schema" and type(fmt.get("schema")) is dict:
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


_KNOWN = {"model", "messages", "system", "max_tokens", "stop_sequences", "stream", "temperature", "top_p",
          "tools", "tool_choice", "thinking", "output_config"}


def to_chat(body: dict, model: ModelConf) -> dict:
    """A Messages request (checked by `check`) -> an OpenAI chat request for `model`'s provider."""
    check_blocks(body)
    chat: dict = {"model": body["model"], "messages": _messages(body),
                  "max_tokens": min(body["max_tokens"], model.max_output_tokens)}
    for k in ("temperature", "top_p"):
        if body.get(k) is not None:
            chat[k] = body[k]
    stops = body.get("stop_sequences")
    if type(stops) is list and stops:
        chat["stop"] = stops[:4]
    if model.supports_function_calling:
        _tools(body, chat)
    elif body.get("tools"):
        log.debug("anthropic_messages: tools dropped: %s does not call functions", model.name)
    _reasoning(body, model, chat)
    if body.get("stream") is True:
        chat["stream"] = True
    for k in body.keys() - _KNOWN:
        if k not in _DROP:
            log.debug("anthropic_messages: unknown field %r dropped", k)
    return chat


# -- response -------------------------------------------------------------------------------------
def usage_out(u: dict | None) -> dict:
    """OpenAI usage (prompt_tokens includes cache reads and writes; checked by the caller, as billed) ->
    Anthropic usage."""
    u = u if type(u) is dict else {}
    read = count(_details(u, "prompt_tokens_details").get("cached_tokens"))
    write = count(u.get("cache_creation_input_tokens"))
    return {"input_tokens": max(count(u.get("prompt_tokens")) - read - write, 0),
            "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
            "output_tokens": count(u.get("completion_tokens"))}


def _msg_id(chat_id: str | None) -> str:
    return chat_id if chat_id and chat_id.startswith("msg_") else "msg_" + (chat_id or os.urandom(12).hex())


def _input(args) -> dict:
    try:
        v = orjson.loads(args) if type(args) is str else args
    except orjson.JSONDecodeError:
        return {"input": args}
    return v if type(v) is dict else {"input": v}


def from_chat(obj: dict) -> dict:
    """A chat completion -> a Message."""
    choice = (obj.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict] = []
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for c in msg.get("tool_calls") or ():
        fn = c.get("function") or {}
        content.append({"type": "tool_use", "id": c.get("id") or "toolu_" + os.urandom(12).hex(),
                        "name": fn.get("name"), "input": _input(fn.get("arguments") or "{}")})
    return {"id": _msg_id(obj.get("id")), "type": "message", "role": "assistant", "model": obj.get("model") or "",
            "content": content, "stop_reason": STOP.get(choice.get("finish_reason"), "end_turn"),
            "stop_sequence": None, "usage": usage_out(obj.get("usage"))}


# -- stream ---------------------------------------------------------------------------------------
def event(name: str, obj: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


_PING = event("ping", {"type": "ping"})


class MessagesStream(ChunkEvents):
    """OpenAI chat chunk events (what a provider's stream translator gives) -> Messages events.

    Wraps the provider's translator so that the pipeline reads its usage and error as before; `end`
    gives the closing events once the upstream's usage is in (OpenAI sends it after the last chunk).
    """

    __slots__ = ("model", "estimate", "started", "block", "kind", "tools", "stop", "failed")

    def __init__(self, inner, model: str, estimate: int):
        self.inner = inner
        self.model = model
        self.estimate = estimate          # input tokens for message_start when the upstream has not said yet
        self.started = False
        self.block = -1                   # index of the open content block, -1: none
        self.kind = ""                    # its type: "text" or "tool_use"
        self.tools: dict[int, int] = {}   # chat tool_calls index -> content block index
        self.stop: str | None = None
        self.failed = False

    def _start(self, chat_id: str | None, out: list[bytes]) -> None:
        self.started = True
        u = usage_out(self.inner.usage) if self.inner.usage else {
            "input_tokens": self.estimate, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": 0}
        out.append(event("message_start", {"type": "message_start", "message": {
            "id": _msg_id(chat_id), "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": u}}))
        out.append(_PING)

    def _close_block(self, out: list[bytes]) -> None:
        if self.block >= 0 and self.kind:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": self.block}))
            self.kind = ""

    def _open(self, block: dict, out: list[bytes]) -> None:
        self._close_block(out)
        self.block += 1
        self.kind = block["type"]
        out.append(event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                 "content_block": block}))

    def _chunk(self, obj: dict, out: list[bytes]) -> None:
        if not self.started:
            self._start(obj.get("id"), out)
        for ch in obj.get("choices") or ():
            d = ch.get("delta") or {}
            text = d.get("content")
            if text:
                if self.kind != "text":
                    self._open({"type": "text", "text": ""}, out)
                out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                         "delta": {"type": "text_delta", "text": text}}))
            for tc in d.get("tool_calls") or ():
                k = tc.get("index", 0)
                fn = tc.get("function") or {}
                if k not in self.tools:
                    self._open({"type": "tool_use", "id": tc.get("id") or "toolu_" + os.urandom(12).hex(),
                                "name": fn.get("name") or "", "input": {}}, out)
                    self.tools[k] = self.block
                args = fn.get("arguments")
                if args and self.tools[k] == self.block:
                    out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                             "delta": {"type": "input_json_delta",
                                                                       "partial_json": args}}))
            if ch.get("finish_reason"):
                self.stop = STOP.get(ch["finish_reason"], "end_turn")

    def end(self, usage: dict | None) -> bytes:
        """The closing events, with the final usage (OpenAI form, or None if the upstream gave none);
        nothing after an error event, which ends a Messages stream."""
        if self.failed:
            return b""
        out: list[bytes] = []
        if not self.started:
            self._start(None, out)
        self._close_block(out)
        u = usage_out(usage) if usage else {"output_tokens": 0}
        out.append(event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": self.stop or "end_turn", "stop_sequence": None}, "usage": u}))
        out.append(event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def fail(self, message: str) -> bytes:
        if self.failed:
            return b""
        self.failed = True
        return error_event(message)


def error_event(message: str) -> bytes:
    return event("error", {"type": "error", "error": {"type": "api_error", "message": message}})


# -- count_tokens -----------------------------------------------------------------------------------
_IMAGE_TOKENS = 1600     # Anthropic's documented ceiling for one image (about 1.15 megapixels)


def _text_bound(s: str) -> int:
    """Tokens of a text, counted high: a token per 3 characters of ASCII (English and code run at about
    4), plus a token per extra UTF-8 byte beyond the first of every other character (CJK and emoji come
    to one to three tokens a character in the usual vocabularies)."""
    n = len(s)
    return (n + 2) // 3 + (len(s.encode("utf-8", "surrogatepass")) - n)


def estimate_tokens(body: dict) -> int:
    """`count_tokens` for models without a tokenizer here: an estimate meant never to undercount (see
    `_text_bound`; images at Anthropic's ceiling), over the system prompt, messages and tool definitions."""
    total = 0
    stack: list = [body.get("system"), body.get("messages"), body.get("tools")]
    while stack:
        v = stack.pop()
        if type(v) is str:
            total += _text_bound(v)
        elif type(v) is list:
            total += 3
            stack.extend(v)
        elif type(v) is dict:
            src = v.get("source")
            if v.get("type") in ("image", "document") and type(src) is dict and src.get("type") in ("base64", "url"):
                total += _IMAGE_TOKENS
                continue
            for k, x in v.items():
                if k != "cache_control":
                    total += _text_bound(k)
                    stack.append(x)
    return total


# -- native pass-through (anthropic/*) ------------------------------------------------------------
def usage_in(u: dict | None) -> dict:
    """Anthropic usage -> the OpenAI usage the accounting reads (prompt_tokens includes cache reads and writes)."""
    u = u if type(u) is dict else {}
    return cached_usage(u.get("input_tokens") or 0, u.get("cache_read_input_tokens") or 0,
                        u.get("cache_creation_input_tokens") or 0, u.get("output_tokens") or 0)


class NativeStream(NativeRelay):
    """An Anthropic stream relayed byte for byte (event framing normalized); the usage is read from
    message_start and the cumulative message_delta, an `error` event noted."""

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict = {}

    def _events(self, raws: list[bytes]) -> list[bytes]:
        out = []
        for raw in raws:
            if b"message_start" in raw or b"message_delta" in raw or b"error" in raw:
                try:
                    ev = orjson.loads(parse_event(raw)[1])
                except orjson.JSONDecodeError:
                    ev = None
                t = ev.get("type") if type(ev) is dict else None
                if t == "message_start":
                    self._raw = dict((ev.get("message") or {}).get("usage") or {})
                    self.usage = usage_in(self._raw)
                elif t == "message_delta" and type(ev.get("usage")) is dict:
                    self._raw.update({k: v for k, v in ev["usage"].items() if v is not None})
                    self.usage = usage_in(self._raw)
                elif t == "error":
                    err = ev.get("error") or {}
                    self.error = f"{err.get('type', 'error')}: {err.get('message', '')}"
            out.append(raw + b"\n\n")
        return out

    @staticmethod
    def fail(message: str) -> bytes:
        return error_event(message)
