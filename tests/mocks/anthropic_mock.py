"""A mock of Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) on loopback, faithful
to its documented shapes. Fields that come with a beta (`context_management`, a tool's `defer_loading`,
mid-conversation system turns) are taken only with that beta in `anthropic-beta`, as Claude Code sends it.

It checks what the real API checks for what the gateway relies on: the key (`x-api-key`, or
`Authorization: Bearer` as the newer SDKs send it), the `anthropic-version` header, required fields (`model`, `max_tokens`, `messages`), no unknown
top-level fields, roles (no "system" role in messages), non-empty messages and text blocks (a
message's text may not be whitespace alone), image sources
(base64 data that matches its media type, or url), tool_result blocks answering the tool_use
blocks of the previous assistant turn, at most 4 `cache_control` breakpoints, and the current
models' refusal of `temperature` with `top_p`, structured outputs (`output_config.format`) only on the
models that have them and with the schemas they take (every object `additionalProperties: false`; no
numeric or length bounds), forced tool_choice refused with extended thinking. Answers are documented
Message objects (a structured output's text is JSON valid against the schema; a tool's input is valid
against its input_schema) and stream
events (message_start, content_block_start/delta/stop with text_delta and input_json_delta,
message_delta, message_stop, ping, error); a tool called without arguments streams only an empty
`partial_json`.

Prompt caching as documented: the prefix up to a block marked with cache_control (order: tools,
system, messages) is cached when it has at least the model's minimum of tokens (1,024; 4,096 for
Haiku 4.5); a later request with the same prefix reads it (`cache_read_input_tokens`), the
first one writes it (`cache_creation_input_tokens`), and `input_tokens` counts only the rest.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import time

from aiohttp import web

from tests.mocks.openai_mock import Scripted
from tests.mocks.schema_instance import instance, tool_args

MODELS = {"claude-haiku-4-5": 4096, "claude-sonnet-4-5": 1024, "claude-opus-4-1": 1024}   # min cacheable tokens
STRUCTURED = {"claude-haiku-4-5", "claude-sonnet-4-5"}    # structured outputs (output_config.format) are GA for these
# JSON Schema features structured outputs refuse (Anthropic's "JSON Schema limitations").
_UNSUPPORTED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
                "maxItems", "uniqueItems", "patternProperties", "if", "then", "else", "not")
ONE_SAMPLER = {"claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1"}
_TOP = {"model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
        "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers",
        "output_config"}
# Fields, tool keys and message roles taken only with the beta that brings them (the `anthropic-beta` header,
# which Claude Code sends): the gateway must forward the header with the body.
BETA_FIELDS = {"context_management": "context-management-"}
BETA_TOOL_KEYS = {"defer_loading": "advanced-tool-use-"}
BETA_SYSTEM_TURNS = "mid-conversation-tool-changes-"
_MAGIC = {"image/png": b"\x89PNG", "image/jpeg": b"\xff\xd8\xff", "image/gif": b"GIF8", "image/webp": b"RIFF"}
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


def tokens_of(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class Invalid(Exception):
    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.type = type_


def anthropic_error(status: int, type_: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": type_, "message": message},
                              "request_id": "req_mock"}, status=status)


class MockAnthropic:
    def __init__(self, api_key: str = "sk-ant-api03-mock-secret-0123456789"):
        self.api_key = api_key
        self.requests: list[dict] = []
        self.script: list[Scripted] = []
        self.chunk_delay = 0.0
        self._cache: dict[str, int] = {}
        self.active_streams = 0
        self.cancelled_streams = 0
        self.completed_streams = 0
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/messages", self.handle)
        self.app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        self.url = ""

    def reset(self) -> None:
        self.requests.clear()
        self.script.clear()
        self.chunk_delay = 0.0
        self._cache.clear()
        self.cancelled_streams = 0
        self.completed_streams = 0

    # -- validation -------------------------------------------------------------------------
    def _check_block(self, b, where: str, role: str) -> None:
        if not isinstance(b, dict) or "type" not in b:
            raise Invalid(f"{where}: Input should be a valid dictionary or object to extract fields from")
        t = b["type"]
        if t in ("image", "document") and not isinstance(b.get("source"), dict):
            raise Invalid(f"{where}.source: Input should be a valid dictionary or object to extract fields from")
        if t == "text":
            if not isinstance(b.get("text"), str):
                raise Invalid(f"{where}.text: Field required")
            if not b["text"]:
                raise Invalid("messages: text content blocks must be non-empty")
        elif t == "image":
            if role != "user":
                raise Invalid(f"{where}: image blocks are only allowed in user messages")
            src = b.get("source") or {}
            if src.get("type") == "base64":
                mt = src.get("media_type")
                if mt not in _MAGIC:
                    raise Invalid(f"{where}.source.media_type: Input should be 'image/jpeg', 'image/png', "
                                  "'image/gif' or 'image/webp'")
                try:
                    raw = base64.b64decode(src.get("data", ""), validate=True)
                except ValueError:
                    raise Invalid(f"{where}.source.base64: invalid base64 data") from None
                if not raw.startswith(_MAGIC[mt]):
                    raise Invalid(f"{where}.source.base64.data: Image does not match the provided media type {mt}")
            elif src.get("type") == "url":
                if not str(src.get("url", "")).startswith(("http://", "https://")):
                    raise Invalid(f"{where}.source.url: invalid URL")
            else:
                raise Invalid(f"{where}.source: Input tag {src.get('type')!r} found using 'type' does not match "
                              "any of the expected tags: 'base64', 'url'")
        elif t == "document":
            if (b.get("source") or {}).get("type") not in ("base64", "text", "url", "content"):
                raise Invalid(f"{where}.source: invalid document source")
        elif t == "tool_use":
            if role != "assistant":
                raise Invalid(f"{where}: tool_use blocks are only allowed in assistant messages")
            if not b.get("id") or not b.get("name") or not isinstance(b.get("input"), dict):
                raise Invalid(f"{where}: tool_use blocks need id, name and an object input")
        elif t == "tool_result":
            if role != "user":
                raise Invalid(f"{where}: tool_result blocks are only allowed in user messages")
            if not b.get("tool_use_id"):
                raise Invalid(f"{where}.tool_use_id: Field required")
        elif t in ("thinking", "redacted_thinking"):
            pass
        else:
            raise Invalid(f"{where}: Input tag {t!r} found using 'type' does not match any of the expected tags")
        cc = b.get("cache_control")
        if cc is not None and (not isinstance(cc, dict) or cc.get("type") != "ephemeral"):
            raise Invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")

    def _validate(self, body: dict, betas: str = "") -> None:
        extra = sorted(k for k in set(body) - _TOP if not (k in BETA_FIELDS and BETA_FIELDS[k] in betas))
        if extra:
            raise Invalid(f"{extra[0]}: Extra inputs are not permitted")
        for f in ("model", "max_tokens", "messages"):
            if f not in body:
                raise Invalid(f"{f}: Field required")
        if body["model"] not in MODELS:
            raise Invalid(f"model: {body['model']}", 404, "not_found_error")
        mt = body["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise Invalid("max_tokens: Input should be a valid integer greater than or equal to 1")
        if body["model"] in ONE_SAMPLER and body.get("temperature") is not None and body.get("top_p") is not None:
            raise Invalid("`temperature` and `top_p` cannot both be specified for this model. Please use only one.")
        t = body.get("temperature")
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool)):
            raise Invalid("temperature: Input should be a valid number")
        if t is not None and not 0 <= t <= 1:
            raise Invalid("temperature: range: 0..1")
        th = body.get("thinking")
        if th is not None:
            if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled", "adaptive"):
                raise Invalid("thinking.type: Input tag does not match any of the expected tags: 'enabled', "
                              "'disabled', 'adaptive'")
            if th["type"] == "enabled" and not (isinstance(th.get("budget_tokens"), int)
                                                 and 1024 <= th["budget_tokens"] < mt):
                raise Invalid("thinking.enabled.budget_tokens: Input should be at least 1024 and less than max_tokens")
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise Invalid("messages: at least one message is required")
        sysv = body.get("system")
        if sysv is not None and not isinstance(sysv, str):
            if not isinstance(sysv, list):
                raise Invalid("system: Input should be a valid string or list")
            for j, b in enumerate(sysv):
                if not isinstance(b, dict) or b.get("type") != "text":
                    raise Invalid(f"system.{j}.type: Input should be 'text'")
                self._check_block(b, f"system.{j}", "system")
        prev_tool_ids: set[str] = set()
        for i, m in enumerate(msgs):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "system" and BETA_SYSTEM_TURNS not in betas:
                raise Invalid('messages: Unexpected role "system". The Messages API accepts a top-level `system` '
                              'parameter, not "system" as an input message role.')
            if role not in ("user", "assistant", "system"):
                raise Invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            c = m.get("content")
            blocks = [{"type": "text", "text": c}] if isinstance(c, str) else c
            if not isinstance(blocks, list):
                raise Invalid(f"messages.{i}.content: Input should be a valid list")
            if not c and not (role == "assistant" and i == len(msgs) - 1):
                raise Invalid(f"messages.{i}: all messages must have non-empty content except for the optional "
                              "final assistant message")
            for j, b in enumerate(blocks if not isinstance(c, str) else []):
                self._check_block(b, f"messages.{i}.content.{j}", role)
            if c and all(isinstance(b, dict) and b.get("type") == "text" and not b["text"].strip() for b in blocks):
                raise Invalid("messages: text content blocks must contain non-whitespace text")
            results = {b.get("tool_use_id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"}
            unknown = results - prev_tool_ids
            if unknown:
                raise Invalid(f"messages.{i}.content.0: unexpected `tool_use_id` found in `tool_result` blocks: "
                              f"{sorted(unknown)[0]}. Each `tool_result` block must have a corresponding `tool_use` "
                              "block in the previous message.")
            if prev_tool_ids and not prev_tool_ids <= results:
                raise Invalid(f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                              f"after: {sorted(prev_tool_ids - results)[0]}. Each `tool_use` block must have a "
                              "corresponding `tool_result` block in the next message.")
            prev_tool_ids = {b["id"] for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"}
        tools = body.get("tools") or []
        for k, tool in enumerate(tools):
            if not _TOOL_NAME.match(str(tool.get("name", ""))):
                raise Invalid(f"tools.{k}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise Invalid(f"tools.{k}.custom.input_schema.type: Input should be 'object'")
            extra = {k for k in set(tool) - {"name", "description", "input_schema", "cache_control", "type"}
                     if not (k in BETA_TOOL_KEYS and BETA_TOOL_KEYS[k] in betas)}
            if extra:
                raise Invalid(f"tools.{k}.custom.{sorted(extra)[0]}: Extra inputs are not permitted")
        tc = body.get("tool_choice")
        if tc is not None:
            if tc.get("type") not in ("auto", "any", "tool", "none"):
                raise Invalid("tool_choice.type: Input tag does not match any of the expected tags: 'auto', 'any', "
                              "'tool', 'none'")
            if tc["type"] == "tool" and not tc.get("name"):
                raise Invalid("tool_choice.tool.name: Field required")
        if tc is not None and tc["type"] in ("any", "tool") and (body.get("thinking") or {}).get("type") == "enabled":
            raise Invalid("Thinking may not be enabled when tool_choice forces tool use.")
        oc = body.get("output_config")
        if oc is not None:
            fmt = oc.get("format") if isinstance(oc, dict) else None
            if fmt is not None:
                if body["model"] not in STRUCTURED:
                    raise Invalid(f"'{body['model']}' does not support output_config.format.")
                if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
                    raise Invalid("output_config.format: Input tag does not match the expected tag 'json_schema'")
                self._check_schema(fmt["schema"], "output_config.format.schema")
        marks = sum(1 for b in self._flat(body) if isinstance(b, dict) and b.get("cache_control"))
        if marks > 4:
            raise Invalid(f"A maximum of 4 blocks with cache_control may be provided. Found {marks}.")

    def _check_schema(self, schema, where: str) -> None:
        if isinstance(schema, list):
            for i, sub in enumerate(schema):
                self._check_schema(sub, f"{where}.{i}")
            return
        if not isinstance(schema, dict):
            return
        for k in _UNSUPPORTED:
            if k in schema:
                raise Invalid(f"{where}: '{k}' is not supported in structured outputs schemas")
        if schema.get("type") == "object" and schema.get("additionalProperties") is not False:
            raise Invalid(f"{where}: For 'object' type, 'additionalProperties' must be explicitly set to false")
        if schema.get("minItems") not in (None, 0, 1):
            raise Invalid(f"{where}: 'minItems' values other than 0 or 1 are not supported")
        for k, v in schema.items():
            if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
                for name, sub in v.items():
                    self._check_schema(sub, f"{where}.{k}.{name}")
            elif k in ("items", "anyOf", "allOf", "oneOf"):
                self._check_schema(v, f"{where}.{k}")

    # -- caching ------------------------------------------------------------------------------
    @staticmethod
    def _flat(body: dict) -> list:
        out: list = list(body.get("tools") or [])
        s = body.get("system")
        out += [{"type": "text", "text": s}] if isinstance(s, str) else list(s or [])
        for m in body["messages"]:
            c = m["content"]
            out += [{"type": "text", "text": c}] if isinstance(c, str) else list(c)
        return out

    def _caching(self, body: dict) -> tuple[int, int, int]:
        """(input_tokens, cache_read, cache_creation) of a request."""
        blocks = self._flat(body)
        texts = [json.dumps(b, sort_keys=True) if b.get("type") != "text" else b["text"] for b in blocks]
        counts = [tokens_of(t) for t in texts]
        total = sum(counts)
        minimum = MODELS[body["model"]]
        read = 0
        write_to = 0
        h = hashlib.sha256(body["model"].encode())
        upto = 0
        for i, (b, t) in enumerate(zip(blocks, texts)):
            h.update(t.encode())
            upto += counts[i]
            if b.get("cache_control") and upto >= minimum:
                key = h.hexdigest()
                if key in self._cache:
                    read = upto
                else:
                    write_to = upto
                    self._cache[key] = upto
        creation = max(0, write_to - read)
        return total - read - creation, read, creation

    # -- answers ------------------------------------------------------------------------------
    @staticmethod
    def _text(c) -> str:
        if isinstance(c, str):
            return c
        parts = []
        for b in c:
            if b.get("type") == "text":
                parts.append(b["text"])
            elif b.get("type") == "image":
                src = b["source"]
                if src["type"] == "base64":
                    parts.append(f"[image {src['media_type']} {len(base64.b64decode(src['data']))} bytes]")
                else:
                    parts.append(f"[image {src['url']}]")
            elif b.get("type") == "tool_result":
                rc = b.get("content", "")
                parts.append(rc if isinstance(rc, str) else " ".join(x.get("text", "") for x in rc))
        return " ".join(parts)

    def _reply(self, body: dict, s: Scripted | None = None) -> tuple[list[dict], str, str | None]:
        last = [m for m in body["messages"] if m["role"] != "system"][-1]
        c = last["content"]
        is_result = isinstance(c, list) and any(b.get("type") == "tool_result" for b in c)
        h = hashlib.md5(json.dumps(body["messages"]).encode()).hexdigest()[:20]
        if s is not None and s.tool:
            return [{"type": "tool_use", "id": "toolu_" + h, "name": s.tool[0], "input": s.tool[1]}], "tool_use", None
        if s is not None and s.text is not None:
            return [{"type": "text", "text": s.text}], "end_turn", None
        tc = body.get("tool_choice") or {"type": "auto"}
        if body.get("tools") and tc["type"] != "none" and last["role"] == "user" and not is_result:
            name = tc["name"] if tc["type"] == "tool" else body["tools"][0]["name"]
            tool = next(t for t in body["tools"] if t["name"] == name)
            return [{"type": "tool_use", "id": "toolu_" + h, "name": name,
                     "input": tool_args(tool["input_schema"])}], "tool_use", None
        fmt = (body.get("output_config") or {}).get("format")
        if fmt:
            return [{"type": "text", "text": json.dumps(instance(fmt["schema"]))}], "end_turn", None
        text = ("The tool said: " if is_result else "echo: ") + self._text(c)
        for s in body.get("stop_sequences") or []:
            if s in text:
                return [{"type": "text", "text": text[: text.index(s)]}], "stop_sequence", s
        words = text.split(" ")
        if len(words) > body["max_tokens"]:
            return [{"type": "text", "text": " ".join(words[: body["max_tokens"]])}], "max_tokens", None
        return [{"type": "text", "text": text}], "end_turn", None

    def _auth(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("Authorization", "")
        if not key and auth.startswith("Bearer "):   # newer SDKs send the key this way; the API takes both
            key = auth[7:]
        if not key:
            return anthropic_error(401, "authentication_error", "x-api-key header is required")
        if key != self.api_key:
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    async def count_tokens(self, request: web.Request) -> web.Response:
        """POST /v1/messages/count_tokens: a Messages request without max_tokens; the input tokens it would
        count (every token the prompt has, cached or not)."""
        raw = await request.read()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "raw": raw,
                              "time": time.time()})
        err = self._auth(request)
        if err is not None:
            return err
        try:
            body = json.loads(raw)
            if "max_tokens" in body:
                raise Invalid("max_tokens: Extra inputs are not permitted")
            self._validate({**body, "max_tokens": 1}, request.headers.get("anthropic-beta", ""))
        except ValueError:
            return anthropic_error(400, "invalid_request_error", "There was an error parsing the body of your request.")
        except Invalid as e:
            return anthropic_error(e.status, e.type, str(e))
        blocks = self._flat({**body, "messages": body["messages"]})
        n = sum(tokens_of(json.dumps(b, sort_keys=True) if b.get("type") != "text" else b["text"]) for b in blocks)
        return web.json_response({"input_tokens": n})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        rec = {"path": request.path, "headers": dict(request.headers), "raw": raw, "time": time.time()}
        self.requests.append(rec)
        err = self._auth(request)
        if err is not None:
            return err
        try:
            body = json.loads(raw)
        except ValueError:
            return anthropic_error(400, "invalid_request_error", "There was an error parsing the body of your request.")
        rec["json"] = body
        s = None
        if self.script:
            s = self.script.pop(0)
            if s.delay:
                await asyncio.sleep(s.delay)
            if s.status != 200 or s.body is not None:
                if isinstance(s.body, (dict, list)):
                    return web.json_response(s.body, status=s.status, headers=s.headers)
                return web.Response(body=s.body or b"", status=s.status, headers=s.headers)
        try:
            self._validate(body, request.headers.get("anthropic-beta", ""))
        except Invalid as e:
            return anthropic_error(e.status, e.type, str(e))
        content, stop, stop_seq = self._reply(body, s)
        inp, read, creation = self._caching(body)
        out_tokens = max(1, sum(len(b.get("text", json.dumps(b.get("input"))).split()) for b in content))
        msg_id = "msg_" + hashlib.md5(f"{time.time()}{len(self.requests)}".encode()).hexdigest()[:24]
        usage = {"input_tokens": inp, "cache_creation_input_tokens": creation, "cache_read_input_tokens": read,
                 "output_tokens": out_tokens, "service_tier": "standard"}
        if not body.get("stream"):
            return web.json_response({"id": msg_id, "type": "message", "role": "assistant", "model": body["model"],
                                      "content": content, "stop_reason": stop, "stop_sequence": stop_seq,
                                      "usage": usage})
        return await self._stream(request, body, msg_id, content, stop, stop_seq, usage, s)

    async def _stream(self, request, body, msg_id, content, stop, stop_seq, usage, s: Scripted | None):
        events: list[tuple[str, dict]] = [("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}}),
            ("ping", {"type": "ping"})]
        for i, b in enumerate(content):
            if b["type"] == "text":
                events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "text", "text": ""}}))
                words = b["text"].split(" ")
                for k, w in enumerate(words):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "text_delta", "text": w if k == 0 else " " + w}}))
            else:
                events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}}))
                args = json.dumps(b["input"]) if b["input"] else ""
                events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "input_json_delta", "partial_json": ""}}))
                for k in range(0, len(args), 6):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "input_json_delta", "partial_json": args[k:k + 6]}}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
        events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop,
                                                                             "stop_sequence": stop_seq},
                                         "usage": {"output_tokens": usage["output_tokens"]}}))
        events.append(("message_stop", {"type": "message_stop"}))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.active_streams += 1
        try:
            for i, (name, data) in enumerate(events):
                if s is not None and s.cut_after is not None and i >= s.cut_after:
                    request.transport.close()
                    return resp
                if s is not None and s.error_after is not None and i >= s.error_after:
                    await resp.write(b"event: error\ndata: " + json.dumps({"type": "error", "error": {
                        "type": "overloaded_error", "message": "Overloaded"}}).encode() + b"\n\n")
                    return resp
                await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            self.completed_streams += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled_streams += 1
            raise
        finally:
            self.active_streams -= 1
        return resp
