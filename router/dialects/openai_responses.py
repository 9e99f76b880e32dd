"""OpenAI Responses (`POST /v1/responses`) <-> the internal chat form (OpenAI chat), for models other than
openai/* (which get the request as sent).

Request (`to_chat`): `instructions` first as a system message, then the input items: messages (input_text,
input_image, input_file, output_text parts; `developer` is a system turn), `function_call` /
`function_call_output`, Codex's `custom_tool_call` (freeform tools such as apply_patch) and
`local_shell_call` pairs as tool calls and results. Tools: `function` tools as they are; a `custom` tool
becomes a function taking one string `input`; `local_shell` a function taking the exec action. Hosted
tools (web_search, file_search, ...) and `reasoning` items (encrypted for OpenAI alone) are dropped
with a debug log. `max_output_tokens` (held to the model's maximum), `temperature`, `top_p`,
`reasoning.effort` (where the model reasons), `text.format` -> `response_format`, `tool_choice`,
`parallel_tool_calls`, `user` map; other fields are dropped with a debug log.

Response (`from_chat`) and stream (`ResponsesStream`): output items of the same kinds the tools were
declared as, usage in the Responses shape, and the documented event sequence (response.created,
in_progress, output_item.added / done, content_part.*, output_text.delta / done,
function_call_arguments.delta / done) that always ends in `response.completed`, `response.incomplete`
(with its reason) or `response.failed`.
"""
from __future__ import annotations

import logging
import os
import time

import orjson

from common.asgi import HTTPError

from ..catalog import ModelConf
from ..sse import parse_event
from . import ChunkEvents, NativeRelay, _details, count

log = logging.getLogger("cborg.dialects")

_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_KNOWN = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
          "temperature", "top_p", "reasoning", "text", "stream", "store", "previous_response_id", "user"}
_DROP = {"include", "metadata", "prompt_cache_key", "truncation", "service_tier", "safety_identifier",
         "stream_options", "background", "prompt", "top_logprobs", "max_tool_calls", "conversation",
         "client_metadata"}
LOCAL_SHELL = {"type": "object", "properties": {
    "command": {"type": "array", "items": {"type": "string"}, "description": "The command and its arguments"},
    "workdir": {"type": "string"}, "timeout_ms": {"type": "integer"}}, "required": ["command"]}


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def _bad(message: str, param: str | None = None, code: str | None = None) -> HTTPError:
    return HTTPError(400, message, param=param, code=code or ("invalid_value" if param else None))


_JSON_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}
# Fields a Response echoes back (or the translation reads), with the JSON types the API documents for them;
# null is always allowed.
_TYPES = (("user", (str,), "a string"), ("store", (bool,), "a boolean"),
          ("parallel_tool_calls", (bool,), "a boolean"), ("tools", (list,), "an array"),
          ("tool_choice", (str, dict), "a string or an object"), ("max_output_tokens", (int,), "an integer"),
          ("temperature", (int, float), "a number"), ("top_p", (int, float), "a number"),
          ("text", (dict,), "an object"), ("reasoning", (dict,), "an object"), ("metadata", (dict,), "an object"))
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512


def _type_error(param: str, want: str, v) -> HTTPError:
    return _bad(f"Invalid type for '{param}': expected {want}, but got {_JSON_KINDS.get(type(v), 'null')} instead.",
                param, "invalid_type")


def _check_types(body: dict) -> None:
    """The echoed fields have their documented types (a Response that cannot be written back is not
    sent upstream first); plain type checks, no walk of the values but metadata's (16 pairs at most)."""
    for k, types, want in _TYPES:
        v = body.get(k)
        if v is not None and type(v) not in types:
            raise _type_error(k, want, v)
    for i, t in enumerate(body.get("tools") or ()):
        if type(t) is not dict:
            raise _type_error(f"tools[{i}]", "an object", t)
    text = body.get("text")
    if text is not None and text.get("format") is not None and type(text["format"]) is not dict:
        raise _type_error("text.format", "an object", text["format"])
    r = body.get("reasoning")
    if r is not None:
        for k in ("effort", "summary"):
            if r.get(k) is not None and type(r[k]) is not str:
                raise _type_error(f"reasoning.{k}", "a string", r[k])
    md = body.get("metadata")
    if md:
        if len(md) > METADATA_PAIRS:
            raise _bad(f"Invalid 'metadata': too many properties. Expected an object with at most {METADATA_PAIRS} "
                       f"properties, but got an object with {len(md)} properties instead.", "metadata",
                       "object_above_max_properties")
        for k, v in md.items():
            if len(k) > METADATA_KEY:
                raise _bad(f"Invalid 'metadata': key too long. Expected keys of at most {METADATA_KEY} characters, "
                           f"but got a key with length {len(k)} instead.", "metadata", "string_above_max_length")
            if type(v) is not str:
                raise _type_error(f"metadata.{k}", "a string", v)
            if len(v) > METADATA_VALUE:
                raise _bad(f"Invalid 'metadata.{k}': string too long. Expected a string with maximum length "
                           f"{METADATA_VALUE}, but got a string with length {len(v)} instead.", f"metadata.{k}",
                           "string_above_max_length")


def check(body: dict) -> None:
    inp = body.get("input")
    if inp is not None and type(inp) is not str and type(inp) is not list:
        raise _bad("Invalid type for 'input': expected a string or an array of input items.", "input")
    if inp is None and not body.get("previous_response_id"):
        raise _bad("Missing required parameter: 'input'.", "input")
    for k in ("instructions", "previous_response_id"):
        if body.get(k) is not None and type(body[k]) is not str:
            raise _bad(f"Invalid type for '{k}': expected a string.", k)
    if body.get("background") is True:
        raise _bad("background responses are not supported by this gateway; send the request without it.",
                   "background")
    _check_types(body)


def input_items(body: dict) -> list[dict]:
    """The request's input as a list of items (a string is one user message)."""
    inp = body.get("input")
    if type(inp) is str:
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}]
    return [x for x in inp or () if type(x) is dict]


def with_instructions(body: dict, prompt: str) -> None:
    """An alias's system prompt before the caller's `instructions` (native pass-through)."""
    ins = body.get("instructions")
    body["instructions"] = prompt + ("\n\n" + ins if ins else "")


# -- request --------------------------------------------------------------------------------------
def tool_kinds(body: dict) -> dict[str, str]:
    """name -> "custom" | "local_shell" for the tools that are not plain functions."""
    kinds = {}
    for t in body.get("tools") or ():
        if type(t) is dict:
            if t.get("type") == "custom" and type(t.get("name")) is str:
                kinds[t["name"]] = "custom"
            elif t.get("type") == "local_shell":
                kinds["local_shell"] = "local_shell"
    return kinds


def _parts(content) -> list[dict] | str:
    if type(content) is str:
        return content
    out = []
    for p in content if type(content) is list else ():
        if type(p) is not dict:
            continue
        t = p.get("type")
        if t in ("input_text", "output_text", "text", "summary_text"):
            out.append({"type": "text", "text": p.get("text") or ""})
        elif t == "refusal":
            out.append({"type": "text", "text": p.get("refusal") or ""})
        elif t == "input_image" and p.get("image_url"):
            iu = {"url": p["image_url"]}
            if p.get("detail") in ("low", "high"):
                iu["detail"] = p["detail"]
            out.append({"type": "image_url", "image_url": iu})
        elif t == "input_file" and p.get("file_data"):
            out.append({"type": "file", "file": {"filename": p.get("filename") or "file",
                                                 "file_data": p["file_data"]}})
        else:
            log.debug("openai_responses: content part %r dropped", t)
    if len(out) == 1 and out[0]["type"] == "text":
        return out[0]["text"]
    return out


def _text(content) -> str:
    c = _parts(content)
    return c if type(c) is str else "\n".join(p["text"] for p in c if p["type"] == "text")


def _call(msgs: list[dict], call_id: str, name: str, arguments: str) -> None:
    """A tool call joins the assistant turn just before it, as parallel calls do in chat."""
    tc = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = msgs[-1] if msgs else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(tc)
    else:
        msgs.append({"role": "assistant", "content": None, "tool_calls": [tc]})


def _messages(body: dict, items: list[dict]) -> list[dict]:
    msgs: list[dict] = []
    if body.get("instructions"):
        msgs.append({"role": "system", "content": body["instructions"]})
    for it in items:
        t = it.get("type") or ("message" if "role" in it else None)
        if t == "message":
            role = it.get("role")
            role = "system" if role == "developer" else role
            if role == "assistant":
                text = _text(it.get("content"))
                if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1].get("tool_calls"):
                    msgs[-1]["content"] = (msgs[-1]["content"] or "") + text
                else:
                    msgs.append({"role": "assistant", "content": text})
            elif role in ("user", "system"):
                msgs.append({"role": role, "content": _parts(it.get("content"))})
        elif t == "function_call":
            _call(msgs, it.get("call_id") or "", it.get("name") or "", it.get("arguments") or "{}")
        elif t == "custom_tool_call":
            _call(msgs, it.get("call_id") or "", it.get("name") or "",
                  orjson.dumps({"input": it.get("input") or ""}).decode())
        elif t == "local_shell_call":
            action = it.get("action")
            action = {k: v for k, v in action.items() if k != "type"} if type(action) is dict else {}
            _call(msgs, it.get("call_id") or it.get("id") or "", "local_shell", orjson.dumps(action).decode())
        elif t in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            out = it.get("output")
            msgs.append({"role": "tool", "tool_call_id": it.get("call_id") or it.get("id") or "",
                         "content": out if type(out) is str else _text(out)})
        else:
            log.debug("openai_responses: input item %r dropped", t)
    return msgs


def _tools(body: dict, chat: dict) -> None:
    tools = []
    for t in body.get("tools") or ():
        kind = t.get("type") if type(t) is dict else None
        if kind == "function" and t.get("name"):
            fn = {"name": t["name"], "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
            if t.get("description"):
                fn["description"] = t["description"]
            if t.get("strict") is True:
                fn["strict"] = True
        elif kind == "custom" and t.get("name"):
            fmt, desc = t.get("format"), t.get("description")
            hint = f" The input follows this {fmt.get('syntax')} grammar:\n{fmt.get('definition')}" \
                if type(fmt) is dict and fmt.get("type") == "grammar" else ""
            fn = {"name": t["name"], "description": (desc if type(desc) is str else "") + hint, "parameters": {
                "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}
        elif kind == "local_shell":
            fn = {"name": "local_shell", "description": "Run a command in a local shell.", "parameters": LOCAL_SHELL}
        else:
            log.debug("openai_responses: tool %r dropped (hosted tools have no chat counterpart)", kind)
            continue
        tools.append({"type": "function", "function": fn})
    if not tools:
        return
    chat["tools"] = tools
    tc = body.get("tool_choice")
    if tc in ("none", "required", "auto"):
        chat["tool_choice"] = tc
    elif type(tc) is dict and tc.get("type") in ("function", "custom") and tc.get("name"):
        chat["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
    if body.get("parallel_tool_calls") is False:
        chat["parallel_tool_calls"] = False


def to_chat(body: dict, model: ModelConf, items: list[dict]) -> dict:
    """A Responses request -> an OpenAI chat request; `items` is the whole input (earlier turns of a
    `previous_response_id` first)."""
    chat: dict = {"model": body["model"], "messages": _messages(body, items)}
    mt = body.get("max_output_tokens")
    if type(mt) is int and mt > 0:
        chat["max_tokens"] = min(mt, model.max_output_tokens)
    for k in ("temperature", "top_p", "user"):
        if body.get(k) is not None:
            chat[k] = body[k]
    if model.supports_function_calling:
        _tools(body, chat)
    elif body.get("tools"):
        log.debug("openai_responses: tools dropped: %s does not call functions", model.name)
    r = body.get("reasoning")
    takes = model.supports_reasoning if model.supports_reasoning_effort is None else model.supports_reasoning_effort
    if type(r) is dict and r.get("effort") in _EFFORT and takes:
        chat["reasoning_effort"] = _EFFORT[r["effort"]]
    fmt = (body.get("text") or {}).get("format") if type(body.get("text")) is dict else None
    if type(fmt) is dict and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif type(fmt) is dict and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    if body.get("stream") is True:
        chat["stream"] = True
    for k in body.keys() - _KNOWN:
        if k not in _DROP:
            log.debug("openai_responses: unknown field %r dropped", k)
    # What the Response echoes but the chat request may not carry (a hosted tool, a text.format key) must be
    # writable too: orjson's JSONEncodeError here is the pipeline's 400 (too deep), before the upstream call.
    orjson.dumps((body.get("tools"), body.get("tool_choice"), fmt))
    return chat


# -- response -------------------------------------------------------------------------------------
def usage_out(u: dict | None) -> dict:
    """OpenAI chat usage (checked by the caller, as billed) -> Responses usage."""
    u = u if type(u) is dict else {}
    p, c = count(u.get("prompt_tokens")), count(u.get("completion_tokens"))
    return {"input_tokens": p,
            "input_tokens_details": {"cached_tokens": count(_details(u, "prompt_tokens_details").get("cached_tokens"))},
            "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens":
                                      count(_details(u, "completion_tokens_details").get("reasoning_tokens"))},
            "total_tokens": p + c}


def usage_in(u: dict | None) -> dict:
    """Responses usage (a native answer) -> the OpenAI chat usage the accounting reads (which checks the
    counts, so odd ones are kept for it to name)."""
    u = u if type(u) is dict else {}
    p, c = u.get("input_tokens") or 0, u.get("output_tokens") or 0
    return {"prompt_tokens": p, "completion_tokens": c,
            "total_tokens": p + c if type(p) is int and type(c) is int else 0,
            "prompt_tokens_details": {"cached_tokens": _details(u, "input_tokens_details").get("cached_tokens") or 0}}


def _output_item(kind: str | None, call_id: str, name: str, arguments: str) -> dict:
    if kind == "custom":
        try:
            inp = orjson.loads(arguments).get("input", arguments)
        except (orjson.JSONDecodeError, AttributeError):
            inp = arguments
        return {"type": "custom_tool_call", "id": new_id("ctc"), "call_id": call_id, "name": name,
                "input": inp if type(inp) is str else orjson.dumps(inp).decode(), "status": "completed"}
    if kind == "local_shell":
        try:
            action = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            action = {"command": [arguments]}
        return {"type": "local_shell_call", "id": new_id("lsh"), "call_id": call_id, "status": "completed",
                "action": {"type": "exec", **(action if type(action) is dict else {"command": [str(action)]})}}
    return {"type": "function_call", "id": new_id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
            "status": "completed"}


def message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id or new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def response_object(body: dict, rid: str, created: int, model: str, output: list[dict], usage: dict | None,
                    status: str = "completed", incomplete: str | None = None, error: dict | None = None) -> dict:
    """A Response as the API documents it (echoing the request's settings)."""
    text = body.get("text") if type(body.get("text")) is dict else {}
    r = body.get("reasoning") if type(body.get("reasoning")) is dict else {}
    return {"id": rid, "object": "response", "created_at": created, "status": status, "background": False,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model, "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": r.get("effort"), "summary": r.get("summary")},
            "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
            "text": {"format": text.get("format") or {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0), "truncation": "disabled",
            "usage": usage, "user": body.get("user"), "metadata": body.get("metadata") or {}}


def from_chat(obj: dict, body: dict, rid: str) -> dict:
    """A chat completion -> a Response."""
    choice = (obj.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    kinds = tool_kinds(body)
    output = []
    if msg.get("content"):
        output.append(message_item(msg["content"]))
    for c in msg.get("tool_calls") or ():
        fn = c.get("function") or {}
        output.append(_output_item(kinds.get(fn.get("name")), c.get("id") or new_id("call"), fn.get("name") or "",
                                   fn.get("arguments") or "{}"))
    reason = _INCOMPLETE.get(choice.get("finish_reason"))
    return response_object(body, rid, int(time.time()), obj.get("model") or "", output,
                           usage_out(obj.get("usage")), "incomplete" if reason else "completed", reason)


# -- stream ---------------------------------------------------------------------------------------
class ResponsesStream(ChunkEvents):
    """OpenAI chat chunk events (what a provider's stream translator gives) -> Responses events.

    Wraps the provider's translator (the pipeline reads its usage and error); `end` closes the open
    items and sends the terminal event with the usage; `fail` sends `response.failed`. `final` is the
    last Response object (what the store keeps)."""

    __slots__ = ("body", "rid", "model", "created", "seq", "started", "output", "open", "text",
                 "calls", "kinds", "finish", "final")

    def __init__(self, inner, body: dict, rid: str, model: str):
        self.inner = inner
        self.body = body
        self.rid = rid
        self.model = model
        self.created = int(time.time())
        self.seq = 0
        self.started = False
        self.output: list[dict] = []       # items done
        self.open: dict | None = None      # the item being streamed
        self.text: list[str] = []
        self.calls: dict[int, dict] = {}   # chat tool_calls index -> its item (arguments accumulate)
        self.kinds = tool_kinds(body)
        self.finish: str | None = None
        self.final: dict | None = None

    def _ev(self, typ: str, fields: dict, out: list[bytes]) -> None:
        fields["type"] = typ
        fields["sequence_number"] = self.seq
        self.seq += 1
        out.append(b"event: " + typ.encode() + b"\ndata: " + orjson.dumps(fields) + b"\n\n")

    def _response(self, status: str, usage=None, incomplete=None, error=None) -> dict:
        return response_object(self.body, self.rid, self.created, self.model, list(self.output), usage, status,
                               incomplete, error)

    def _start(self, out: list[bytes]) -> None:
        self.started = True
        r = self._response("in_progress")
        self._ev("response.created", {"response": r}, out)
        self._ev("response.in_progress", {"response": r}, out)

    def _close_item(self, out: list[bytes]) -> None:
        item = self.open
        if item is None:
            return
        self.open = None
        idx = len(self.output)
        if item["type"] == "message":
            text = "".join(self.text)
            self.text = []
            base = {"item_id": item["id"], "output_index": idx, "content_index": 0}
            self._ev("response.output_text.done", {**base, "text": text, "logprobs": []}, out)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            self._ev("response.content_part.done", {**base, "part": part}, out)
            item = message_item(text, item["id"])
        else:
            args = item.pop("_args")
            done = _output_item(self.kinds.get(item["name"]), item["call_id"], item["name"], "".join(args) or "{}")
            done["id"] = item["id"]
            if done["type"] == "function_call":
                self._ev("response.function_call_arguments.done",
                         {"item_id": item["id"], "output_index": idx, "arguments": done["arguments"]}, out)
            item = done
        self._ev("response.output_item.done", {"output_index": idx, "item": item}, out)
        self.output.append(item)

    def _chunk(self, obj: dict, out: list[bytes]) -> None:
        for ch in obj.get("choices") or ():
            d = ch.get("delta") or {}
            text = d.get("content")
            if text:
                if self.open is None or self.open["type"] != "message":
                    self._close_item(out)
                    self.open = {"type": "message", "id": new_id("msg")}
                    item = {"type": "message", "id": self.open["id"], "status": "in_progress", "role": "assistant",
                            "content": []}
                    idx = len(self.output)
                    self._ev("response.output_item.added", {"output_index": idx, "item": item}, out)
                    self._ev("response.content_part.added", {"item_id": item["id"], "output_index": idx,
                                                              "content_index": 0, "part": {
                                                                  "type": "output_text", "text": "",
                                                                  "annotations": [], "logprobs": []}}, out)
                self.text.append(text)
                self._ev("response.output_text.delta", {"item_id": self.open["id"], "output_index": len(self.output),
                                                        "content_index": 0, "delta": text, "logprobs": []}, out)
            for tc in d.get("tool_calls") or ():
                k = tc.get("index", 0)
                fn = tc.get("function") or {}
                item = self.calls.get(k)
                if item is None:
                    self._close_item(out)
                    name = fn.get("name") or ""
                    kind = self.kinds.get(name)
                    prefix, typ = {"custom": ("ctc", "custom_tool_call"),
                                   "local_shell": ("lsh", "local_shell_call")}.get(kind, ("fc", "function_call"))
                    item = self.calls[k] = self.open = {"type": typ, "id": new_id(prefix),
                                                        "call_id": tc.get("id") or new_id("call"), "name": name,
                                                        "_args": []}
                    added = {"type": typ, "id": item["id"], "call_id": item["call_id"], "status": "in_progress"}
                    if typ == "function_call":
                        added.update(name=name, arguments="")
                    elif typ == "custom_tool_call":
                        added.update(name=name, input="")
                    self._ev("response.output_item.added", {"output_index": len(self.output), "item": added}, out)
                args = fn.get("arguments")
                if args and item is self.open:
                    item["_args"].append(args)
                    if item["type"] == "function_call":
                        self._ev("response.function_call_arguments.delta",
                                 {"item_id": item["id"], "output_index": len(self.output), "delta": args}, out)
            if ch.get("finish_reason"):
                self.finish = ch["finish_reason"]

    def _on(self, obj: dict, out: list[bytes]) -> None:
        if self.final is not None:
            return
        if not self.started:
            self._start(out)
        super()._on(obj, out)

    def end(self, usage: dict | None) -> bytes:
        """The terminal event (nothing after `fail`): completed, or incomplete with its reason."""
        if self.final is not None:
            return b""
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        self._close_item(out)
        reason = _INCOMPLETE.get(self.finish)
        self.final = self._response("incomplete" if reason else "completed", usage_out(usage) if usage else None,
                                    reason)
        self._ev("response.incomplete" if reason else "response.completed", {"response": self.final}, out)
        return b"".join(out)

    def fail(self, message: str) -> bytes:
        if self.final is not None:
            return b""
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        self.final = self._response("failed", error={"code": "server_error", "message": message})
        self._ev("response.failed", {"response": self.final}, out)
        return b"".join(out)


# -- native pass-through (openai/*) -----------------------------------------------------------------
_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")


class NativeStream(NativeRelay):
    """An OpenAI Responses stream relayed byte for byte (event framing normalized); the response id is
    read from response.created, the usage from the terminal event. `final` is that last Response."""

    __slots__ = ("final", "rid")

    def __init__(self) -> None:
        super().__init__()
        self.final: dict | None = None
        self.rid: str | None = None

    def _events(self, raws: list[bytes]) -> list[bytes]:
        out = []
        for raw in raws:
            if self.rid is None and b"response.created" in raw or any(t in raw for t in _TERMINAL) \
                    or b'"error"' in raw:
                try:
                    ev = orjson.loads(parse_event(raw)[1])
                except orjson.JSONDecodeError:
                    ev = None
                t = ev.get("type") if type(ev) is dict else None
                r = ev.get("response") if type(ev) is dict and type(ev.get("response")) is dict else {}
                if t == "response.created":
                    self.rid = r.get("id")
                elif t in ("response.completed", "response.incomplete", "response.failed"):
                    self.final = r
                    if r.get("usage"):
                        self.usage = usage_in(r["usage"])
                    if t == "response.failed":
                        self.error = str((r.get("error") or {}).get("message") or "response.failed")
                elif t == "error":
                    self.error = str(ev.get("message") or ev.get("error") or "error")
            out.append(raw + b"\n\n")
        return out

    def fail(self, message: str) -> bytes:
        """The relay broke before the upstream's terminal event: say so as the API would."""
        if self.final is not None:
            return b""
        self.final = {"id": self.rid, "object": "response", "status": "failed",
                      "error": {"code": "server_error", "message": message}}
        return (b"event: response.failed\ndata: " + orjson.dumps({"type": "response.failed", "response": self.final})
                + b"\n\n")
