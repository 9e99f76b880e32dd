"""A mock of the OpenAI API on loopback, faithful to its documented shapes.

It checks what the real API checks for the behaviours we rely on (Bearer key, required fields,
reasoning models' parameter rules (o1-mini takes no `reasoning_effort`), no unknown fields on
messages, content parts or tools) and answers with documented
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

REASONING = {"o1", "o1-mini", "o3-mini"}
TOOL_ARGS = {"location": "Berkeley, CA", "unit": "c"}   # the mocks' tool call arguments ({} for a tool without any)
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


def _unexpected(obj: dict, allowed: set, where: str) -> web.Response | None:
    extra = set(obj) - allowed
    if not extra:
        return None
    return openai_error(400, f"Additional properties are not allowed ({', '.join(map(repr, sorted(extra)))} was "
                             f"unexpected) - '{where}'", param=where)


@dataclass
class Scripted:
    """A canned reply for the next request: status + body, or a stream cut after `cut_after` chunks."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut_after: int | None = None       # stream: drop the connection after this many chunks
    error_after: int | None = None     # stream: send an error event after this many chunks


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

    def reset(self) -> None:
        self.requests.clear()
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
                    if "cache_control" in part:
                        return openai_error(400, "Unrecognized request argument supplied: cache_control",
                                            param=f"messages.{i}.content.{j}")
        for k, t in enumerate(body.get("tools") or []):
            err = _unexpected(t, _TOOL_FIELDS, f"tools.{k}")
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

    def _reply(self, body: dict, prompt: str) -> tuple[str, list | None, str]:
        msgs = body.get("messages") or []
        tools = body.get("tools")
        last = msgs[-1] if msgs else {}
        if tools and body.get("tool_choice") != "none" and last.get("role") == "user":
            fn = tools[0]["function"]
            if isinstance(body.get("tool_choice"), dict):
                name = body["tool_choice"]["function"]["name"]
                fn = next(t["function"] for t in tools if t["function"]["name"] == name)
            args = TOOL_ARGS if (fn.get("parameters") or {}).get("properties") else {}
            call = {"id": "call_" + hashlib.md5(prompt.encode()).hexdigest()[:12], "type": "function",
                    "function": {"name": fn["name"], "arguments": json.dumps(args)}}
            return "", [call], "tool_calls"
        if last.get("role") == "tool":
            return f"The tool said: {_text(last.get('content'))}", None, "stop"
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
        text, calls, finish = self._reply(body, prompt) if chat else (f"echo: {prompt}", None, "stop")
        usage = self._usage(prompt, text or json.dumps(calls))
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
