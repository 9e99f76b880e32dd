"""Anthropic Messages API (`POST /v1/messages`) under the OpenAI chat schema.

Pure translations, no I/O (the pipeline does that):
- `to_messages_body`: an OpenAI chat request -> a Messages request. System and developer
  messages become top-level `system` blocks; `cache_control` is kept where the caller put it
  (on a message: its last block; on a content part: that block); consecutive same-role turns are
  merged; `image_url` parts become image blocks (data URLs as base64, http(s) URLs as url
  sources); tools, tool choice, tool calls and tool results map to `tools`, `tool_choice`,
  `tool_use` and `tool_result` blocks; `stop` -> `stop_sequences`; a default `max_tokens` (4,096,
  or the model's `params`) when the caller gives none. OpenAI-only parameters the Messages API would
  reject (seed, penalties, logprobs...) are dropped; `n` > 1 is refused. A JSON `response_format`
  becomes structured outputs (`output_config.format`) on models with `supports_response_schema`,
  else a forced tool (JSON_TOOL) whose input is returned as the message's content.
  Blank text is left out (the API refuses empty and whitespace-only text blocks); a user message
  left with nothing says "(empty)", as OpenAI takes an empty message.
- `to_chat_completion`: a Message -> an OpenAI chat completion.
- `AnthropicStream`: Messages stream events -> OpenAI chunks, tool-call arguments in order.
Usage follows the OpenAI convention the accounting uses: `prompt_tokens` = input + cache read +
cache creation, `prompt_tokens_details.cached_tokens` = cache read, and
`cache_creation_input_tokens` reported alongside (priced at the cache-write rate).
"""
from __future__ import annotations

import time

import orjson


from ..catalog import Route
from ..sse import SSESplitter, parse_event
from .base import (EMPTY_TEXT, JSON_TOOL, bad_request, cached_usage, data_url, Endpoint, error_event, error_text, function_tools,
                   json_format, json_tool_check, scrub, SSETranslator, ToolCallChunks, UpstreamRequest, file_data, image_url, tool_call)

PATH = "/v1/messages"
DEFAULT_VERSION = "2023-06-01"

# The Messages API requires max_tokens. LiteLLM's default (what CBorg users have had); a model's
# `params: {max_tokens: N}` in models.yaml sets another.
DEFAULT_MAX_TOKENS = 4096

FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
          "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}

# Extended-thinking budgets for OpenAI's reasoning_effort.
_THINKING = {"low": 1024, "medium": 2048, "high": 4096}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


# -- request --------------------------------------------------------------------------------
def _image_block(part: dict, param: str) -> dict:
    url = image_url(part)
    if type(url) is not str or not url:
        raise bad_request(f"{param}.image_url.url is required.", param)
    if url.startswith("data:"):
        media, data = data_url(url, param, "")
        if media not in _IMAGE_TYPES:
            raise bad_request(f"{param}: image type {media!r} is not supported; use one of {', '.join(_IMAGE_TYPES)}.",
                       param)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise bad_request(f"{param}: image_url.url must be an http(s) or data: URL.", param)


def _file_block(part: dict, param: str) -> dict:
    media, b64 = file_data(part, param)
    return {"type": "document", "source": {"type": "base64", "media_type": media, "data": b64}}


def _blocks(content, param: str, allow_media: bool = True) -> list[dict]:
    """OpenAI message content (string or parts) -> Anthropic content blocks (blank text left out)."""
    if type(content) is str:
        return [{"type": "text", "text": content}] if content.strip() else []
    if content is None:
        return []
    if type(content) is not list:
        raise bad_request(f"{param}.content must be a string or a list of content parts.", f"{param}.content")
    out = []
    for j, part in enumerate(content):
        p = f"{param}.content[{j}]"
        if type(part) is not dict:
            raise bad_request(f"{p} must be an object.", p)
        t = part.get("type")
        if t == "text":
            text = part.get("text")
            if type(text) is not str:
                raise bad_request(f"{p}.text must be a string.", p)
            if not text.strip():
                continue
            block = {"type": "text", "text": text}
        elif t == "image_url" and allow_media:
            block = _image_block(part, p)
        elif t == "file" and allow_media:
            block = _file_block(part, p)
        else:
            raise bad_request(f"{p}: content part type {t!r} is not supported here.", p)
        cc = part.get("cache_control")
        if cc:
            block["cache_control"] = cc
        out.append(block)
    return out


def _mark(blocks: list[dict], m: dict) -> None:
    """A message-level cache_control marks the end of that message: its last block."""
    cc = m.get("cache_control")
    if cc and blocks:
        blocks[-1]["cache_control"] = cc


def _tool_use(call: dict, param: str) -> dict:
    name, inp = tool_call(call, param)
    return {"type": "tool_use", "id": call.get("id") or "toolu_missing", "name": name, "input": inp}


def _tool_result(m: dict, param: str) -> dict:
    tid = m.get("tool_call_id")
    if not tid:
        raise bad_request(f"{param}.tool_call_id is required for role 'tool'.", f"{param}.tool_call_id")
    content = m.get("content")
    block: dict = {"type": "tool_result", "tool_use_id": tid}
    if type(content) is str:
        if content.strip():
            block["content"] = content
    else:
        parts = _blocks(content, param)
        if parts:
            block["content"] = parts
    cc = m.get("cache_control")
    if cc:
        block["cache_control"] = cc
    return block


def _messages(msgs: list, out: dict) -> None:
    system: list[dict] = []
    turns: list[dict] = []
    for i, m in enumerate(msgs):
        role = m.get("role")
        p = f"messages[{i}]"
        if role == "user":
            content = m.get("content")
            if type(content) is str and content.strip() and not m.get("cache_control"):
                blocks = [{"type": "text", "text": content}]
            else:
                blocks = _blocks(content, p)
                _mark(blocks, m)
        elif role == "assistant":
            blocks = _blocks(m.get("content"), p, allow_media=False)
            calls = m.get("tool_calls")
            if calls:
                if type(calls) is not list:
                    raise bad_request(f"{p}.tool_calls must be a list.", f"{p}.tool_calls")
                blocks += [_tool_use(c, f"{p}.tool_calls[{k}]") for k, c in enumerate(calls)]
            _mark(blocks, m)
            if not blocks:
                continue  # an empty assistant turn (content "" and no calls) says nothing
        elif role == "tool":
            role = "user"
            blocks = [_tool_result(m, p)]
        elif role in ("system", "developer"):
            blocks = _blocks(m.get("content"), p, allow_media=False)
            _mark(blocks, m)
            system += blocks
            continue
        else:
            raise bad_request(f"{p}.role {role!r} is not supported; use system, user, assistant or tool.", f"{p}.role")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise bad_request("messages must contain at least one user message besides system messages.", "messages")
    for t in turns:   # an empty user message: OpenAI takes it, the Messages API needs some text
        if not t["content"]:
            t["content"] = [{"type": "text", "text": EMPTY_TEXT}]
    if system:
        if len(system) == 1 and "cache_control" not in system[0]:
            out["system"] = system[0]["text"]
        else:
            out["system"] = system
    for t in turns:  # a lone text block is sent as a plain string, as the API's own examples do
        c = t["content"]
        if len(c) == 1 and c[0]["type"] == "text" and len(c[0]) == 2:
            t["content"] = c[0]["text"]
    out["messages"] = turns


def _tools(body: dict, out: dict) -> None:
    tools = function_tools(body)
    if not tools:
        return
    conv = []
    for k, fn in tools:
        tool = {"name": fn["name"], "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            tool["description"] = fn["description"]
        cc = body["tools"][k].get("cache_control")
        if cc:
            tool["cache_control"] = cc
        conv.append(tool)
    out["tools"] = conv
    choice = body.get("tool_choice")
    tc: dict | None
    if choice is None or choice == "auto":
        tc = {"type": "auto"}
    elif choice == "required":
        tc = {"type": "any"}
    elif choice == "none":
        tc = {"type": "none"}
    elif type(choice) is dict and type(choice.get("function")) is dict and choice["function"].get("name"):
        tc = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise bad_request("tool_choice must be 'auto', 'required', 'none' or {'type': 'function', 'function': "
                   "{'name': ...}}.", "tool_choice")
    if body.get("parallel_tool_calls") is False and tc["type"] != "none":
        tc["disable_parallel_tool_use"] = True
    if choice is not None or "disable_parallel_tool_use" in tc:
        out["tool_choice"] = tc


def _response_format(route: Route, body: dict, out: dict) -> None:
    """A JSON response_format: Anthropic's structured outputs (`output_config.format`, the schema
    made acceptable by the Anthropic SDK's own `transform_schema`) for models that have them and a
    schema; otherwise a forced tool whose input is the answer (what LiteLLM does), turned back into
    the message's content by `to_chat_completion` and the stream translator."""
    schema = json_format(body)
    if schema is None:
        return
    rf_kind = body["response_format"]["type"]
    if rf_kind == "json_schema" and route.model.supports_response_schema:
        from anthropic import transform_schema   # lazily: only requests with a schema need it
        try:
            fmt = {"type": "json_schema", "schema": transform_schema(schema)}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise bad_request(f"response_format.json_schema.schema cannot be used with '{route.name}': {e}",
                              "response_format") from None
        out["output_config"] = {**(out.get("output_config") or {}), "format": fmt}
        return
    json_tool_check(route.name, body, schema)
    if (out.get("thinking") or {}).get("type") == "enabled":
        raise bad_request(f"'{route.name}' takes response_format through a forced tool, which Anthropic does not "
                          "allow with extended thinking; leave one of them out.", "response_format")
    out["tools"] = [*out.get("tools", ()), {"name": JSON_TOOL, "description": "Give the answer as this tool's "
                                                    "input.", "input_schema": schema}]
    out["tool_choice"] = {"type": "tool", "name": JSON_TOOL}


def to_messages_body(route: Route, body: dict, stream: bool) -> dict:
    """An OpenAI chat request (already validated by the pipeline) -> a Messages API request."""
    n = body.get("n")
    if n not in (None, 1):
        raise bad_request(f"n={n} is not supported for '{route.name}': Anthropic models return one choice.", "n")
    out: dict = {"model": route.model.model}
    _messages(body["messages"], out)
    mt = body.get("max_completion_tokens") or body.get("max_tokens") or min(DEFAULT_MAX_TOKENS,
                                                                             route.model.max_output_tokens)
    out["max_tokens"] = mt
    temp = body.get("temperature")
    if temp is not None:
        out["temperature"] = temp
    elif body.get("top_p") is not None:
        # Current Claude models refuse temperature and top_p together: temperature wins.
        out["top_p"] = body["top_p"]
    if body.get("top_k") is not None:
        out["top_k"] = body["top_k"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if type(stop) is str else list(stop)
    _tools(body, out)
    user = body.get("user")
    if type(user) is str and user:
        out["metadata"] = {"user_id": user}
    thinking = body.get("thinking")
    effort = body.get("reasoning_effort")
    if thinking is None and effort in _THINKING:
        thinking = {"type": "enabled", "budget_tokens": _THINKING[effort]}
    if thinking:
        out["thinking"] = thinking
        if type(thinking) is dict and thinking.get("type") == "enabled":
            # Extended thinking takes no sampling parameters and needs room beyond its budget.
            for k in ("temperature", "top_p", "top_k"):
                out.pop(k, None)
            budget = int(thinking.get("budget_tokens") or 0)
            if out["max_tokens"] <= budget:
                out["max_tokens"] = budget + out["max_tokens"]
    _response_format(route, body, out)
    if stream:
        out["stream"] = True
    return out


def _headers(ep: Endpoint) -> list[tuple[bytes, bytes]]:
    h = ep.extra.get("headers")
    if h is None:
        h = [(b"content-type", b"application/json"),
             (b"anthropic-version", (ep.conf.api_version or DEFAULT_VERSION).encode())]
        if ep.api_key:
            h.append((b"x-api-key", ep.api_key.encode()))
        for k, v in ep.conf.headers.items():
            h.append((k.lower().encode(), v.encode()))
        ep.extra["headers"] = h
    return h


def native(ep: Endpoint, route: Route, path: str, body: dict, client: dict[bytes, bytes]) -> UpstreamRequest:
    """A Messages request passed through as sent (unknown fields included) but for the model's upstream
    name, with the caller's `anthropic-version` and `anthropic-beta` and the gateway's credentials."""
    h = _headers(ep)
    version = client.get(b"anthropic-version")
    if version:
        h = [x for x in h if x[0] != b"anthropic-version"] + [(b"anthropic-version", version)]
    beta = client.get(b"anthropic-beta")
    if beta:
        h = [*h, (b"anthropic-beta", beta)]
    body["model"] = route.model.model
    return UpstreamRequest(path, h, orjson.dumps(body))


def build(ep: Endpoint, route: Route, op: str, body: dict, stream: bool) -> UpstreamRequest:
    if op != "chat":
        raise bad_request(f"'{route.name}' is an Anthropic model: it serves /chat/completions only.", "model")
    return UpstreamRequest(PATH, _headers(ep), orjson.dumps(to_messages_body(route, body, stream)))


# -- response -------------------------------------------------------------------------------
def usage_of(u: dict | None) -> dict:
    """Anthropic usage -> OpenAI usage (prompt_tokens includes cache reads and writes)."""
    u = u or {}
    return cached_usage(u.get("input_tokens") or 0, u.get("cache_read_input_tokens") or 0,
                        u.get("cache_creation_input_tokens") or 0, u.get("output_tokens") or 0)


def to_chat_completion(msg: dict) -> dict:
    text: list[str] = []
    thinking: list[str] = []
    calls = []
    for b in msg.get("content") or ():
        t = b.get("type")
        if t == "text":
            text.append(b["text"])
        elif t == "tool_use" and b.get("name") == JSON_TOOL:    # a response_format's answer
            text.append(orjson.dumps(b.get("input") or {}).decode())
        elif t == "tool_use":
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": orjson.dumps(b.get("input") or {}).decode()}})
        elif t == "thinking":
            thinking.append(b.get("thinking") or "")
    message: dict = {"role": "assistant", "content": "".join(text) if text else None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    return {"id": msg.get("id") or "msg_unknown", "object": "chat.completion", "created": int(time.time()),
            "model": msg.get("model") or "",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "stop" if msg.get("stop_reason") == "tool_use" and not calls
                         else FINISH.get(msg.get("stop_reason"), "stop")}],
            "usage": usage_of(msg.get("usage"))}


def parse(route: Route, op: str, data: bytes) -> dict:
    obj = orjson.loads(data)
    if type(obj) is not dict or obj.get("type") != "message":
        raise ValueError("upstream response is not an Anthropic message")
    return to_chat_completion(obj)


def error_message(status: int, data: bytes) -> str:
    return error_text(data)


# -- stream ---------------------------------------------------------------------------------
class AnthropicStream(SSETranslator, ToolCallChunks):
    """Messages stream events -> OpenAI chat.completion.chunk events (framed SSE bytes)."""

    provider = "Anthropic"
    __slots__ = ("_sse", "usage", "template", "error", "_head", "_tools", "_argless", "_json", "_finish", "_raw")

    def __init__(self) -> None:
        self._sse = SSESplitter()
        self.usage: dict | None = None
        self.template: dict | None = None
        self.error: str | None = None
        self._head = b""                      # the chunk prefix: id, object, created, model
        self._tools: dict[int, int] = {}      # content block index -> OpenAI tool_calls index
        self._argless: set[int] = set()       # tool blocks open with no argument sent yet
        self._json: set[int] = set()          # blocks of the forced tool carrying response_format
        self._finish: str | None = None
        self._raw: dict = {}                  # Anthropic usage as reported so far

    def _event(self, raw: bytes, out: list[bytes]) -> None:
        _, payload = parse_event(raw)
        if not payload:
            return
        ev = orjson.loads(payload)
        t = ev.get("type")
        if t == "content_block_delta":
            d = ev["delta"]
            dt = d.get("type")
            if dt == "text_delta":
                out.append(self._chunk(b'{"content":' + orjson.dumps(d.get("text", "")) + b"}"))
            elif dt == "input_json_delta":
                self._tool_piece(ev.get("index"), d.get("partial_json"), out)
            elif dt == "thinking_delta":
                out.append(self._chunk(b'{"reasoning_content":' + orjson.dumps(d.get("thinking", "")) + b"}"))
        elif t == "message_start":
            m = ev.get("message") or {}
            self.template = {"id": m.get("id") or "msg_unknown", "object": "chat.completion.chunk",
                             "created": int(time.time()), "model": m.get("model") or "", "choices": []}
            self._head = orjson.dumps({k: self.template[k] for k in ("id", "object", "created", "model")})[:-1] + b","
            self._raw = dict(m.get("usage") or {})
            self.usage = usage_of(self._raw)
            out.append(self._chunk(b'{"role":"assistant","content":""}'))
        elif t == "content_block_start":
            cb = ev.get("content_block") or {}
            if cb.get("type") == "tool_use":
                self._tool_start(ev.get("index"), cb.get("id"), cb.get("name"), out)
            elif cb.get("type") == "text" and cb.get("text"):
                out.append(self._chunk(b'{"content":' + orjson.dumps(cb["text"]) + b"}"))
        elif t == "content_block_stop":
            self._block_stop(ev.get("index"), out)
        elif t == "message_delta":
            d = ev.get("delta") or {}
            u = ev.get("usage")
            if u:  # cumulative counts; the input ones may be repeated or left out
                self._raw.update({k: v for k, v in u.items() if v is not None})
                self.usage = usage_of(self._raw)
            if d.get("stop_reason"):
                self._finish = self._finish_reason(FINISH.get(d["stop_reason"], "stop"))
                out.append(self._chunk(b"{}", b'"' + self._finish.encode() + b'"'))
        elif t == "error":
            err = ev.get("error") or {}
            kind, message = err.get("type", "error"), scrub(str(err.get("message", "")))
            self.error = f"{kind}: {message}"
            out.append(error_event(f"Anthropic stream error ({kind}): {message}", err.get("type")))
        # ping, message_stop: nothing to say


def stream(route: Route, op: str) -> AnthropicStream:
    return AnthropicStream()
