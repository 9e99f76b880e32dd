"""A mock of the OpenAI API on loopback, faithful to its documented shapes.

It checks what the real API checks for the behaviours we rely on (Bearer key, required fields,
reasoning models' parameter rules (o1-mini takes no `reasoning_effort`), no unknown fields on
messages, content parts or tools, structured outputs' rules (a strict schema has
`additionalProperties: false` and every property required; JSON mode wants the word "json" in the
messages)) and answers with documented
response and stream shapes, including automatic prompt caching: a prompt of 1,024 tokens or
more whose prefix was seen before reports cached tokens in 128-token steps.
Test code steers it through `script` (canned replies, in order) and reads `requests`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.mocks.schema_instance import TOOL_ARGS, instance, tool_args  # noqa: F401 (TOOL_ARGS: for the other mocks)

REASONING = {"o1", "o1-mini", "o3-mini"}
NO_SCHEMA = {"o1-mini"}      # models without structured outputs
_MSG_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"}
_TOOL_FIELDS = {"type", "function", "custom"}


def tokens_of(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") if p.get("type") == "text" else "[image]" for p in content
                        if isinstance(p, dict))
    return ""


def openai_error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


def _json_kind(v: Any) -> str:
    """How OpenAI's type errors name a JSON value's type."""
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a decimal", str: "a string",
            list: "an array", dict: "an object"}.get(type(v), "a value")


def _unexpected(obj: dict, allowed: set, where: str) -> web.Response | None:
    extra = set(obj) - allowed
    if not extra:
        return None
    return openai_error(400, f"Additional properties are not allowed ({', '.join(map(repr, sorted(extra)))} was "
                             f"unexpected) - '{where}'", param=where)


def _quoted_schema(text: str) -> dict | None:
    """The first JSON Schema (an object with "properties") written out in `text`."""
    dec = json.JSONDecoder()
    i = text.find("{")
    while i >= 0:
        try:
            obj, _ = dec.raw_decode(text, i)
            if isinstance(obj, dict) and "properties" in obj:
                return obj
        except ValueError:
            pass
        i = text.find("{", i + 1)
    return None


def _objects(schema, where: tuple):
    """Every object schema inside `schema`, with where it is (as OpenAI's errors say it)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            yield where, schema
        for k, v in schema.items():
            if k in ("properties", "$defs", "definitions"):
                for name, sub in (v or {}).items():
                    yield from _objects(sub, (*where, k, name))
            elif k in ("items", "additionalProperties") and isinstance(v, dict):
                yield from _objects(v, (*where, k))
            elif k in ("anyOf", "oneOf", "allOf"):
                for i, sub in enumerate(v):
                    yield from _objects(sub, (*where, k, str(i)))


@dataclass
class Scripted:
    """A canned reply for the next request: status + body, or a stream cut after `cut_after` chunks."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut_after: int | None = None       # stream: drop the connection after this many chunks
    error_after: int | None = None     # stream: send an error event after this many chunks
    tool: tuple[str, dict] | None = None   # answer (streamed or not) with a call of this tool with these arguments
    text: str | None = None            # answer (streamed or not) with this text
    usage: dict | None = None          # report this usage (streamed or not) in place of the counted one


class MockOpenAI:
    def __init__(self, api_key: str = "sk-upstream-secret-123456"):
        self.api_key = api_key
        self.requests: list[dict] = []
        self.script: list[Scripted] = []
        self.chunk_delay = 0.0
        self.stream_words = 5
        self._prefixes: set[str] = set()
        self.sent_at: list[float] = []     # when each stream chunk was written
        self.active_streams = 0
        self.cancelled_streams = 0
        self.delay = 0.0                    # before answering any request
        self.active = 0                     # requests being handled now, and the most at once
        self.max_active = 0
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            self.app.router.add_post(p, self.handle)
        self.app.router.add_get("/v1/models", self.models)
        self.responses = ResponsesAPI(self)
        self.app.router.add_post("/v1/responses", self.responses.create)
        self.app.router.add_post("/v1/responses/compact", self.responses.compact)
        self.app.router.add_get("/v1/responses/{id}", self.responses.get)
        self.app.router.add_delete("/v1/responses/{id}", self.responses.delete)
        self.app.router.add_get("/v1/responses/{id}/input_items", self.responses.input_items)

    def reset(self) -> None:
        self.requests.clear()
        self.responses.stored.clear()
        self.script.clear()
        self.chunk_delay = 0.0
        self.stream_words = 5
        self._prefixes.clear()
        self.sent_at.clear()
        self.cancelled_streams = 0
        self.delay = 0.0
        self.max_active = 0

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    # -- prompt caching ---------------------------------------------------------------------
    def _cached(self, prompt: str) -> int:
        toks = tokens_of(prompt)
        cached = 0
        if toks >= 1024:
            # prefixes at 1024 + 128k tokens (4 chars a token)
            n = 1024
            while n <= toks:
                h = hashlib.sha256(prompt[: n * 4].encode()).hexdigest()
                if h in self._prefixes:
                    cached = n
                self._prefixes.add(h)
                n += 128
        return cached

    # -- the endpoint -----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self._handle(request)
        finally:
            self.active -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        rec = {"path": request.path, "headers": dict(request.headers), "raw": raw, "time": time.time()}
        self.requests.append(rec)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            got = request.headers.get("Authorization", "")
            return openai_error(401, f"Incorrect API key provided: {got[7:12]}***. You can find your API key at "
                                     "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        try:
            body = json.loads(raw)
        except ValueError:
            return openai_error(400, "We could not parse the JSON body of your request.")
        rec["json"] = body
        if self.script:
            s = self.script.pop(0)
            if s.delay:
                await asyncio.sleep(s.delay)
            if s.status != 200 or s.body is not None:
                if isinstance(s.body, (dict, list)):
                    return web.json_response(s.body, status=s.status, headers=s.headers)
                return web.Response(body=s.body or b"", status=s.status, headers=s.headers)
            rec["scripted"] = s
        else:
            s = None
        model = body.get("model")
        if not model:
            return openai_error(400, "you must provide a model parameter", param="model")
        if request.path.endswith("/embeddings"):
            return self._embeddings(body)
        if request.path.endswith("/chat/completions"):
            err = self._check_chat(body)
            if err is not None:
                return err
            prompt = "\n".join(_text(m.get("content")) for m in body["messages"])
        else:
            if "prompt" not in body:
                return openai_error(400, "you must provide a prompt parameter", param="prompt")
            prompt = body["prompt"] if isinstance(body["prompt"], str) else json.dumps(body["prompt"])
        return await self._answer(request, body, prompt, s)

    def _check_chat(self, body: dict) -> web.Response | None:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return openai_error(400, "[] is too short - 'messages'", param="messages")
        for i, m in enumerate(msgs):
            err = _unexpected(m, _MSG_FIELDS, f"messages.{i}")
            if err is not None:
                return err
            if isinstance(m.get("content"), list):
                for j, part in enumerate(m["content"]):
                    if not isinstance(part, dict):
                        return openai_error(400, f"Invalid type for 'messages[{i}].content[{j}]': expected an "
                                                 f"object, but got {_json_kind(part)} instead.",
                                            param=f"messages[{i}].content[{j}]", code="invalid_type")
                    if "cache_control" in part:
                        return openai_error(400, "Unrecognized request argument supplied: cache_control",
                                            param=f"messages.{i}.content.{j}")
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            return openai_error(400, f"Invalid type for 'tools': expected an array, but got {_json_kind(tools)} "
                                     "instead.", param="tools", code="invalid_type")
        for k, t in enumerate(tools):
            if not isinstance(t, dict):
                return openai_error(400, f"Invalid type for 'tools[{k}]': expected an object, but got "
                                         f"{_json_kind(t)} instead.", param=f"tools[{k}]", code="invalid_type")
            err = _unexpected(t, _TOOL_FIELDS, f"tools.{k}")
            if err is not None:
                return err
        for name in ("max_tokens", "max_completion_tokens"):     # as OpenAI checks them
            v = body.get(name)
            if v is None:
                continue
            if type(v) is not int:
                return openai_error(400, f"Invalid type for '{name}': expected an integer, but got "
                                         f"{_json_kind(v)} instead.", param=name, code="invalid_type")
            if v < 1:
                return openai_error(400, f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
                                         f"but got {v} instead.", param=name, code="integer_below_min_value")
        err = self._check_response_format(body)
        if err is not None:
            return err
        if body["model"] in REASONING:
            if "max_tokens" in body:
                return openai_error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                         "Use 'max_completion_tokens' instead.", param="max_tokens",
                                    code="unsupported_parameter")
            if "temperature" in body and body["temperature"] != 1:
                return openai_error(400, "Unsupported value: 'temperature' does not support "
                                         f"{body['temperature']} with this model. Only the default (1) value is "
                                         "supported.", param="temperature", code="unsupported_value")
            if body["model"] == "o1-mini" and "reasoning_effort" in body:
                return openai_error(400, "Unknown parameter: 'reasoning_effort'.", param="reasoning_effort",
                                    code="unknown_parameter")
            if body["model"] == "o1-mini" and any(m.get("role") in ("system", "developer") for m in msgs):
                return openai_error(400, "Unsupported value: 'messages[0].role' does not support 'system' with "
                                         "this model.", param="messages[0].role", code="unsupported_value")
        return None

    @staticmethod
    def _check_response_format(body: dict) -> web.Response | None:
        rf = body.get("response_format")
        if rf is None or rf.get("type") == "text":
            return None
        if body["model"] in NO_SCHEMA:
            return openai_error(400, "Invalid parameter: 'response_format' of type "
                                     f"'{rf.get('type')}' is not supported with this model.",
                                param="response_format", code="invalid_parameter")
        if rf.get("type") == "json_object":
            if not any("json" in _text(m.get("content")).lower() for m in body["messages"]):
                return openai_error(400, "'messages' must contain the word 'json' in some form, to use "
                                         "'response_format' of type 'json_object'.", param="messages")
            return None
        js = rf.get("json_schema") if rf.get("type") == "json_schema" else None
        if not isinstance(js, dict) or not js.get("name") or not isinstance(js.get("schema"), dict):
            return openai_error(400, "Missing required parameter: 'response_format.json_schema'.",
                                param="response_format", code="missing_required_parameter")
        if js.get("strict"):
            for where, node in _objects(js["schema"], ()):
                if node.get("additionalProperties") is not False:
                    return openai_error(400, f"Invalid schema for response_format '{js['name']}': In context={where}, "
                                             "'additionalProperties' is required to be supplied and to be false.",
                                        param="response_format", code="invalid_json_schema")
                missing = set(node.get("properties") or {}) - set(node.get("required") or [])
                if missing:
                    return openai_error(400, f"Invalid schema for response_format '{js['name']}': In context={where}, "
                                             f"'required' is required to be supplied and to be an array including "
                                             f"every key in properties. Missing '{sorted(missing)[0]}'.",
                                        param="response_format", code="invalid_json_schema")
        return None

    def _reply(self, body: dict, prompt: str, s: Scripted | None = None) -> tuple[str, list | None, str]:
        msgs = body.get("messages") or []
        tools = body.get("tools")
        last = msgs[-1] if msgs else {}
        if s is not None and s.tool:
            call = {"id": "call_" + hashlib.md5(prompt.encode()).hexdigest()[:12], "type": "function",
                    "function": {"name": s.tool[0], "arguments": json.dumps(s.tool[1])}}
            return "", [call], "tool_calls"
        if s is not None and s.text is not None:
            return s.text, None, "stop"
        if tools and body.get("tool_choice") != "none" and last.get("role") == "user":
            fn = tools[0]["function"]
            if isinstance(body.get("tool_choice"), dict):
                name = body["tool_choice"]["function"]["name"]
                fn = next(t["function"] for t in tools if t["function"]["name"] == name)
            args = tool_args(fn.get("parameters"))
            call = {"id": "call_" + hashlib.md5(prompt.encode()).hexdigest()[:12], "type": "function",
                    "function": {"name": fn["name"], "arguments": json.dumps(args)}}
            return "", [call], "tool_calls"
        if last.get("role") == "tool":
            return f"The tool said: {_text(last.get('content'))}", None, "stop"
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            return json.dumps(instance(rf["json_schema"]["schema"])), None, "stop"
        if rf.get("type") == "json_object":   # a model following a schema quoted in the prompt, as instructor's JSON mode asks
            schema = _quoted_schema(" ".join(_text(m.get("content")) for m in msgs))
            return json.dumps(instance(schema) if schema else {"echo": _text(last.get("content"))}), None, "stop"
        text = f"echo: {_text(last.get('content')) if msgs else prompt}"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        words = text.split()
        if limit and len(words) > limit:
            return " ".join(words[:limit]), None, "length"
        return text, None, "stop"

    def _usage(self, prompt: str, completion: str) -> dict:
        p = tokens_of(prompt)
        c = max(1, len(completion.split()))
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": self._cached(prompt), "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

    async def _answer(self, request: web.Request, body: dict, prompt: str, s: Scripted | None):
        chat = request.path.endswith("/chat/completions")
        text, calls, finish = self._reply(body, prompt, s) if chat else (f"echo: {prompt}", None, "stop")
        usage = self._usage(prompt, text or json.dumps(calls))
        if s is not None and s.usage is not None:
            usage = s.usage
        cid = ("chatcmpl-" if chat else "cmpl-") + hashlib.md5(f"{time.time()}".encode()).hexdigest()[:20]
        created = int(time.time())
        model = body["model"] + "-2024-08-06" if body["model"].startswith("gpt-4o") else body["model"]
        if not body.get("stream"):
            if chat:
                msg = {"role": "assistant", "content": text or None, "refusal": None}
                if calls:
                    msg["tool_calls"] = calls
                choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return web.json_response({"id": cid, "object": obj, "created": created, "model": model,
                                      "system_fingerprint": "fp_mock", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        base = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model, "system_fingerprint": "fp_mock"}
        chunks: list[dict] = []

        def choice(delta=None, text_=None, fin=None):
            if chat:
                return {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": fin}
            return {"index": 0, "text": text_ or "", "logprobs": None, "finish_reason": fin}

        if chat:
            chunks.append({**base, "choices": [choice({"role": "assistant", "content": "", "refusal": None})]})
        if calls:
            c = calls[0]
            args = c["function"]["arguments"]
            chunks.append({**base, "choices": [choice({"tool_calls": [{"index": 0, "id": c["id"], "type": "function",
                                                                       "function": {"name": c["function"]["name"],
                                                                                    "arguments": ""}}]})]})
            for i in range(0, len(args), 7):
                chunks.append({**base, "choices": [choice({"tool_calls": [{"index": 0, "function": {
                    "arguments": args[i:i + 7]}}]})]})
        else:
            words = text.split(" ")
            for i, w in enumerate(words):
                piece = w if i == 0 else " " + w
                chunks.append({**base, "choices": [choice({"content": piece}, piece)]})
        chunks.append({**base, "choices": [choice(fin=finish)]})
        if include_usage:
            for c in chunks:
                c["usage"] = None
            chunks.append({**base, "choices": [], "usage": usage})
        self.active_streams += 1
        try:
            for i, c in enumerate(chunks):
                if s is not None and s.cut_after is not None and i >= s.cut_after:
                    request.transport.close()
                    return resp
                if s is not None and s.error_after is not None and i >= s.error_after:
                    await resp.write(b"data: " + json.dumps({"error": {"message": "The server had an error while "
                                     "processing your request.", "type": "server_error", "param": None,
                                                                       "code": None}}).encode() + b"\n\n")
                    return resp
                await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
                self.sent_at.append(time.time())
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled_streams += 1
            raise
        finally:
            self.active_streams -= 1
        return resp

    def _embeddings(self, body: dict) -> web.Response:
        inp = body.get("input")
        if isinstance(inp, str):
            inp = [inp]
        if not isinstance(inp, list) or not inp:
            return openai_error(400, "'input' must be a string or a non-empty array", param="input")
        dims = body.get("dimensions") or 8
        if type(dims) is not int or not 1 <= dims <= 3072:     # as OpenAI's text-embedding-3-large
            return openai_error(400, "'dimensions' must be an integer from 1 to 3072", param="dimensions")
        data = []
        total = 0
        for i, t in enumerate(inp):
            t = t if isinstance(t, str) else json.dumps(t)
            total += tokens_of(t)
            h = hashlib.sha256(t.encode()).digest()
            vec = [(h[j % 32] - 128) / 128 for j in range(dims)]
            if body.get("encoding_format") == "base64":
                import base64
                import struct
                vec = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": total, "total_tokens": total}})


# -- the Responses API (POST /v1/responses and its stored responses) -------------------------------------
_RESP_FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
                "temperature", "top_p", "reasoning", "text", "stream", "store", "previous_response_id", "user",
                "include", "metadata", "prompt_cache_key", "truncation", "service_tier", "safety_identifier",
                "stream_options", "background", "prompt", "top_logprobs", "max_tool_calls", "conversation",
                "client_metadata"}
_ITEM_TYPES = ("message", "function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output",
               "reasoning", "local_shell_call", "local_shell_call_output", "item_reference", "web_search_call")
_PART_TYPES = {"user": {"input_text", "input_image", "input_file"}, "system": {"input_text"},
               "developer": {"input_text"}, "assistant": {"output_text", "refusal"}}
_TOOL_KEYS = {"function": {"type", "name", "description", "parameters", "strict"},
              "custom": {"type", "name", "description", "format"}, "local_shell": {"type"},
              "namespace": {"type", "name", "description", "tools"},
              "web_search": {"type", "search_context_size", "user_location", "filters", "external_web_access"},
              "web_search_preview": {"type", "search_context_size", "user_location"}}


class ResponsesAPI:
    """OpenAI's Responses API as documented: input items and tools checked by type (a chat-style tool,
    `{"type": "function", "function": {...}}`, is refused as the API refuses it), a tool output must answer
    a call made earlier in the conversation, `reasoning` only for reasoning models, `previous_response_id`
    continues a stored response (`store` defaults to true) and GET/DELETE/input_items read them. Streams are
    the documented event sequence with `sequence_number`s, ending in response.completed or
    response.incomplete; `Scripted.error_after` sends an `error` event instead, `cut_after` drops the
    connection. Answers follow the chat mock's: a tool call when tools are offered to a user turn, "The tool
    said: ..." after a tool output, else "echo: <last user text>"."""

    def __init__(self, mock: "MockOpenAI"):
        self.mock = mock
        self.stored: dict[str, dict] = {}      # id -> {"response": ..., "input": [...]}

    # -- checks -------------------------------------------------------------------------------
    def _check(self, body: dict) -> tuple[list[dict], web.Response | None]:
        for k in body:
            if k not in _RESP_FIELDS:
                return [], openai_error(400, f"Unknown parameter: '{k}'.", param=k, code="unknown_parameter")
        inp = body.get("input")
        if isinstance(inp, str):
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}]
        elif isinstance(inp, list):
            items = inp
        else:
            return [], openai_error(400, "Invalid type for 'input': expected one of a string or array of input "
                                         "items.", param="input", code="invalid_type")
        history: list[dict] = []
        prev = body.get("previous_response_id")
        if prev:
            st = self.stored.get(prev)
            if st is None:
                return [], openai_error(400, f"Previous response with id '{prev}' not found.",
                                        param="previous_response_id", code="previous_response_not_found")
            history = st["input"] + st["response"]["output"]
        calls = {x.get("call_id") for x in history if x.get("type") in ("function_call", "custom_tool_call",
                                                                        "local_shell_call")}
        for i, it in enumerate(items):
            t = it.get("type", "message" if "role" in it else None)
            if t not in _ITEM_TYPES:
                return [], openai_error(400, f"Invalid value: '{t}'. Supported values are: "
                                             f"{', '.join(repr(x) for x in _ITEM_TYPES)}.", param=f"input[{i}].type",
                                        code="invalid_value")
            if t == "message":
                role = it.get("role")
                if role not in _PART_TYPES:
                    return [], openai_error(400, f"Invalid value: '{role}'. Supported values are: 'user', 'assistant', "
                                                 "'system', and 'developer'.", param=f"input[{i}].role")
                c = it.get("content")
                for j, p in enumerate(c if isinstance(c, list) else []):
                    if p.get("type") not in _PART_TYPES[role]:
                        return [], openai_error(400, f"Invalid value: '{p.get('type')}'. Supported values are: "
                                                     f"{', '.join(sorted(_PART_TYPES[role]))}.",
                                                param=f"input[{i}].content[{j}].type")
            elif t in ("function_call", "custom_tool_call", "local_shell_call"):
                calls.add(it.get("call_id"))
            elif t in ("function_call_output", "custom_tool_call_output") and it.get("call_id") not in calls:
                return [], openai_error(400, f"No tool call found for function call output with call_id "
                                             f"{it.get('call_id')}.", param="input")
        for k, tool in enumerate(body.get("tools") or []):
            keys = _TOOL_KEYS.get(tool.get("type"))
            if keys is None:
                return [], openai_error(400, f"Invalid value: '{tool.get('type')}'.", param=f"tools[{k}].type")
            extra = sorted(set(tool) - keys)
            if extra:
                return [], openai_error(400, f"Unknown parameter: 'tools[{k}].{extra[0]}'.", param=f"tools[{k}].{extra[0]}",
                                        code="unknown_parameter")
            if tool["type"] in ("function", "custom", "namespace") and not tool.get("name"):
                return [], openai_error(400, f"Missing required parameter: 'tools[{k}].name'.", param=f"tools[{k}].name")
        r = body.get("reasoning")
        if r and r.get("effort") and body["model"] not in REASONING and not body["model"].startswith(("gpt-5", "o3", "o4")):
            return [], openai_error(400, "Unsupported parameter: 'reasoning.effort' is not supported with this model.",
                                    param="reasoning.effort", code="unsupported_parameter")
        return history + items, None

    # -- answers ------------------------------------------------------------------------------
    @staticmethod
    def _item_text(it: dict) -> str:
        if it.get("type", "message") == "message":
            c = it.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
        out = it.get("output", "")
        return out if isinstance(out, str) else " ".join(p.get("text", "") for p in out if isinstance(p, dict))

    def _output(self, body: dict, items: list[dict], s: Scripted | None) -> tuple[list[dict], str | None]:
        tools = body.get("tools") or []
        last = next((x for x in reversed(items) if x.get("type", "message") != "reasoning"
                     and x.get("role") not in ("system", "developer")), {})
        kind = last.get("type", "message")
        h = hashlib.md5(json.dumps(items).encode()).hexdigest()[:16]
        call = None
        if s is not None and s.tool:
            call = s.tool
        elif (s is None or s.text is None) and tools and body.get("tool_choice") != "none" and kind == "message" \
                and last.get("role") == "user":
            fn = next((t for t in tools if t["type"] in ("function", "custom")), None)
            if fn is not None:
                call = (fn["name"], TOOL_ARGS if (fn.get("parameters") or {}).get("properties") else {})
        if call is not None:
            tool = next((t for t in tools if t.get("name") == call[0]), {"type": "function"})
            if tool["type"] == "custom":
                return [{"type": "custom_tool_call", "id": "ctc_" + h, "call_id": "call_" + h, "name": call[0],
                         "input": call[1].get("input", "") if isinstance(call[1], dict) else call[1],
                         "status": "completed"}], None
            return [{"type": "function_call", "id": "fc_" + h, "call_id": "call_" + h, "name": call[0],
                     "arguments": json.dumps(call[1]), "status": "completed"}], None
        if s is not None and s.text is not None:
            text = s.text
        elif kind.endswith("_output"):
            text = "The tool said: " + self._item_text(last)
        else:
            text = "echo: " + self._item_text(last)
        words = text.split(" ")
        limit = body.get("max_output_tokens")
        incomplete = None
        if limit and len(words) > limit:
            text, incomplete = " ".join(words[:limit]), "max_output_tokens"
        return [{"type": "message", "id": "msg_" + h, "status": "incomplete" if incomplete else "completed",
                 "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": [],
                                                   "logprobs": []}]}], incomplete

    def _response(self, body: dict, rid: str, output: list[dict], usage: dict | None, status: str,
                  incomplete: str | None) -> dict:
        return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
                "background": False, "error": None,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "model": body["model"] + "-2024-08-06" if body["model"].startswith("gpt-4o") else body["model"],
                "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True),
                "temperature": body.get("temperature", 1.0), "text": body.get("text") or {"format": {"type": "text"}},
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": usage, "user": None,
                "metadata": body.get("metadata") or {}}

    def _usage(self, body: dict, items: list[dict], output: list[dict]) -> dict:
        prompt = (body.get("instructions") or "") + "\n" + "\n".join(self._item_text(x) for x in items)
        p = tokens_of(prompt)
        c = max(1, sum(len((self._item_text(x) if x["type"] == "message" else json.dumps(x)).split()) for x in output))
        return {"input_tokens": p, "input_tokens_details": {"cached_tokens": self.mock._cached(prompt)},
                "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c}

    # -- endpoints ----------------------------------------------------------------------------
    async def _begin(self, request: web.Request) -> tuple[dict | None, Scripted | None, web.Response | None]:
        raw = await request.read()
        rec = {"path": request.path, "headers": dict(request.headers), "raw": raw, "time": time.time()}
        self.mock.requests.append(rec)
        if request.headers.get("Authorization") != f"Bearer {self.mock.api_key}":
            return None, None, openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        try:
            body = json.loads(raw)
        except ValueError:
            return None, None, openai_error(400, "We could not parse the JSON body of your request.")
        rec["json"] = body
        s = self.mock.script.pop(0) if self.mock.script else None
        if s is not None and (s.status != 200 or s.body is not None):
            return None, s, web.json_response(s.body, status=s.status, headers=s.headers)
        if not body.get("model"):
            return None, s, openai_error(400, "Missing required parameter: 'model'.", param="model")
        return body, s, None

    async def create(self, request: web.Request) -> web.StreamResponse:
        body, s, err = await self._begin(request)
        if err is not None:
            return err
        items, err = self._check(body)
        if err is not None:
            return err
        output, incomplete = self._output(body, items, s)
        usage = self._usage(body, items, output)
        rid = "resp_" + hashlib.md5(f"{time.time()}{len(self.mock.requests)}".encode()).hexdigest()
        status = "incomplete" if incomplete else "completed"
        final = self._response(body, rid, output, usage, status, incomplete)
        if body.get("store", True):
            new = body["input"] if isinstance(body["input"], list) else items[-1:]
            prev = self.stored[body["previous_response_id"]]["input"] if body.get("previous_response_id") else []
            self.stored[rid] = {"response": final, "input": prev + [{"id": f"in_{i}_{rid[5:13]}", **x}
                                                                      for i, x in enumerate(new)]}
        if not body.get("stream"):
            return web.json_response(final)
        return await self._stream(request, body, final, s)

    async def _stream(self, request: web.Request, body: dict, final: dict, s: Scripted | None):
        events: list[dict] = []
        start = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        events += [{"type": "response.created", "response": start}, {"type": "response.in_progress", "response": start}]
        for i, it in enumerate(final["output"]):
            if it["type"] == "message":
                text = it["content"][0]["text"]
                events.append({"type": "response.output_item.added", "output_index": i,
                               "item": {**it, "status": "in_progress", "content": []}})
                base = {"item_id": it["id"], "output_index": i, "content_index": 0}
                events.append({"type": "response.content_part.added", **base,
                               "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
                for k, w in enumerate(text.split(" ")):
                    events.append({"type": "response.output_text.delta", **base, "delta": w if k == 0 else " " + w,
                                   "logprobs": []})
                events.append({"type": "response.output_text.done", **base, "text": text, "logprobs": []})
                events.append({"type": "response.content_part.done", **base, "part": it["content"][0]})
            elif it["type"] == "function_call":
                events.append({"type": "response.output_item.added", "output_index": i,
                               "item": {**it, "status": "in_progress", "arguments": ""}})
                for k in range(0, len(it["arguments"]), 7):
                    events.append({"type": "response.function_call_arguments.delta", "item_id": it["id"],
                                   "output_index": i, "delta": it["arguments"][k:k + 7]})
                events.append({"type": "response.function_call_arguments.done", "item_id": it["id"],
                               "output_index": i, "arguments": it["arguments"]})
            else:
                events.append({"type": "response.output_item.added", "output_index": i,
                               "item": {**it, "status": "in_progress", "input": ""}})
            events.append({"type": "response.output_item.done", "output_index": i, "item": it})
        events.append({"type": "response.incomplete" if final["status"] == "incomplete" else "response.completed",
                       "response": final})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.mock.active_streams += 1
        try:
            for n, ev in enumerate(events):
                ev["sequence_number"] = n
                if s is not None and s.cut_after is not None and n >= s.cut_after:
                    request.transport.close()
                    return resp
                if s is not None and s.error_after is not None and n >= s.error_after:
                    await resp.write(b"event: error\ndata: " + json.dumps({
                        "type": "error", "code": "server_error", "message": "The server had an error while processing "
                        "your request.", "param": None, "sequence_number": n}).encode() + b"\n\n")
                    return resp
                await resp.write(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode())
                if self.mock.chunk_delay:
                    await asyncio.sleep(self.mock.chunk_delay)
        except (ConnectionResetError, asyncio.CancelledError):
            self.mock.cancelled_streams += 1
            raise
        finally:
            self.mock.active_streams -= 1
        return resp

    async def compact(self, request: web.Request) -> web.Response:
        """POST /v1/responses/compact: the conversation in, a shorter one out (`output` items)."""
        body, s, err = await self._begin(request)
        if err is not None:
            return err
        items, err = self._check({k: v for k, v in body.items() if k in ("model", "input", "instructions")})
        if err is not None:
            return err
        summary = "summary: " + " | ".join(self._item_text(x) for x in items if x.get("type", "message") == "message")
        output = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": summary}]}]
        return web.json_response({"id": "resp_" + hashlib.md5(summary.encode()).hexdigest(), "object": "response.compaction",
                                  "created_at": int(time.time()), "output": output,
                                  "usage": self._usage(body, items, output)})

    def _find(self, request: web.Request) -> tuple[dict | None, web.Response | None]:
        self.mock.requests.append({"path": request.path, "headers": dict(request.headers), "raw": b"",
                                   "time": time.time(), "method": request.method})
        if request.headers.get("Authorization") != f"Bearer {self.mock.api_key}":
            return None, openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        rid = request.match_info["id"]
        st = self.stored.get(rid)
        if st is None:
            return None, openai_error(404, f"Response with id '{rid}' not found.")
        return st, None

    async def get(self, request: web.Request) -> web.Response:
        st, err = self._find(request)
        return err or web.json_response(st["response"])

    async def delete(self, request: web.Request) -> web.Response:
        st, err = self._find(request)
        if err is not None:
            return err
        del self.stored[request.match_info["id"]]
        return web.json_response({"id": request.match_info["id"], "object": "response", "deleted": True})

    async def input_items(self, request: web.Request) -> web.Response:
        st, err = self._find(request)
        if err is not None:
            return err
        data = list(reversed(st["input"])) if request.query.get("order", "desc") == "desc" else list(st["input"])
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": False})
