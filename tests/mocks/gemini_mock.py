"""A mock of the Gemini API (generateContent, streamGenerateContent?alt=sse) on loopback.

It checks what the real API checks for what the gateway relies on: the API key (`x-goog-api-key`
or `?key=`), the model in the path, `contents` present with roles `user`/`model` and non-empty
parts, no unknown fields (proto JSON accepts camelCase and snake_case names), function
declarations with either `parameters` (OpenAPI subset: no `additionalProperties`, `$schema`...)
or `parametersJsonSchema` but not both, and function responses that follow a function-call turn
with as many parts. Answers are documented GenerateContentResponse objects (with
`responseMimeType: application/json`, JSON text valid against `responseJsonSchema`); a stream is SSE events
each carrying one GenerateContentResponse (no [DONE]). Only `alt=sse` streams are served.

Implicit caching as on Gemini 2.5: a request whose prefix of at least 1,024 tokens (2,048 for
Pro) was seen before reports `cachedContentTokenCount` (included in `promptTokenCount`); the field
is absent when nothing was cached. 2.5 models think: `thoughtsTokenCount` is reported. A prompt
containing BLOCK_ANSWER gets a candidate stopped for SAFETY; BLOCK_PROMPT gets no candidate and
`promptFeedback.blockReason`.
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

MODELS = {"gemini-2.5-pro": 2048, "gemini-2.5-flash": 1024, "gemini-2.5-flash-lite": 1024}

_REQ = {"contents", "tools", "toolConfig", "safetySettings", "systemInstruction", "generationConfig",
        "cachedContent", "labels"}
_GEN = {"stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema", "responseModalities",
        "candidateCount", "maxOutputTokens", "temperature", "topP", "topK", "seed", "presencePenalty",
        "frequencyPenalty", "responseLogprobs", "logprobs", "enableEnhancedCivicAnswers", "speechConfig",
        "thinkingConfig", "mediaResolution"}
_PART = {"text", "inlineData", "functionCall", "functionResponse", "fileData", "executableCode",
         "codeExecutionResult", "thought", "thoughtSignature", "videoMetadata"}
_DECL = {"name", "description", "parameters", "parametersJsonSchema", "response", "responseJsonSchema", "behavior"}
_SCHEMA = {"type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties",
           "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
           "propertyOrdering", "default", "items", "minimum", "maximum"}


def tokens_of(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


class Invalid(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.status = status
        self.code = code


def gemini_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "status": code}}, status=status)


def _unknown(obj: dict, allowed: set, where: str) -> None:
    for k in obj:
        if camel(k) not in allowed:
            raise Invalid(f'Invalid JSON payload received. Unknown name "{k}" at \'{where}\': Cannot find field.')


def _get(obj: dict, name: str):
    """A field by its camelCase name, or its snake_case spelling (proto JSON accepts both)."""
    if name in obj:
        return obj[name]
    snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)
    return obj.get(snake)


def _check_schema(s, where: str) -> None:
    if not isinstance(s, dict):
        return
    for k in s:
        if k not in _SCHEMA:
            raise Invalid(f'Invalid JSON payload received. Unknown name "{k}" at \'{where}\': Cannot find field.')
    for name, sub in (s.get("properties") or {}).items():
        _check_schema(sub, f"{where}.properties[{name}].value")
    if "items" in s:
        _check_schema(s["items"], f"{where}.items")


class MockGemini:
    def __init__(self, api_key: str = "AIzaSyMOCKgeminiKEY0123456789abcdefghi"):
        self.api_key = api_key
        self.requests: list[dict] = []
        self.script: list[Scripted] = []
        self.chunk_delay = 0.0
        self._prefixes: set[str] = set()
        self.active_streams = 0
        self.cancelled_streams = 0
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1beta/models/{target}", self.handle)
        self.app.router.add_post("/v1/models/{target}", self.handle)
        self.url = ""

    def reset(self) -> None:
        self.requests.clear()
        self.script.clear()
        self.chunk_delay = 0.0
        self._prefixes.clear()
        self.cancelled_streams = 0

    # -- validation -------------------------------------------------------------------------
    def _validate(self, body: dict) -> None:
        _unknown(body, _REQ, "")
        contents = _get(body, "contents")
        if not contents:
            raise Invalid("* GenerateContentRequest.contents: contents is not specified")
        gen = _get(body, "generationConfig") or {}
        _unknown(gen, _GEN, "generation_config")
        si = _get(body, "systemInstruction")
        if si is not None:
            for j, p in enumerate(si.get("parts") or []):
                _unknown(p, _PART, f"system_instruction.parts[{j}]")
        prev_calls = 0
        for i, c in enumerate(contents):
            role = c.get("role", "user")
            if role not in ("user", "model"):
                raise Invalid("Please use a valid role: user, model.")
            parts = c.get("parts")
            if not parts:
                raise Invalid(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.")
            responses = 0
            for j, p in enumerate(parts):
                _unknown(p, _PART, f"contents[{i}].parts[{j}]")
                inline = _get(p, "inlineData")
                if inline is not None:
                    try:
                        base64.b64decode(inline.get("data", ""), validate=True)
                    except ValueError:
                        raise Invalid(f"Invalid value at 'contents[{i}].parts[{j}].inline_data.data' (TYPE_BYTES), "
                                      "Base64 decoding failed") from None
                    if not _get(inline, "mimeType"):
                        raise Invalid(f"* GenerateContentRequest.contents[{i}].parts[{j}].inline_data.mime_type: "
                                      "mime_type is required")
                if _get(p, "functionResponse") is not None:
                    responses += 1
                    if not _get(p, "functionResponse").get("name"):
                        raise Invalid(f"* GenerateContentRequest.contents[{i}].parts[{j}].function_response.name: "
                                      "Name cannot be empty.")
            if responses and responses != prev_calls:
                raise Invalid("Please ensure that the number of function response parts is equal to the number of "
                              "function call parts of the function call turn.")
            if responses and role != "user":
                raise Invalid("Please ensure that function response turn comes immediately after a function call "
                              "turn.")
            prev_calls = sum(1 for p in parts if _get(p, "functionCall") is not None) if role == "model" else 0
        for t, tool in enumerate(_get(body, "tools") or []):
            for d, decl in enumerate(_get(tool, "functionDeclarations") or []):
                _unknown(decl, _DECL, f"tools[{t}].function_declarations[{d}]")
                if "parameters" in decl and _get(decl, "parametersJsonSchema") is not None:
                    raise Invalid(f"* GenerateContentRequest.tools[{t}].function_declarations[{d}]: parameters and "
                                  "parameters_json_schema are mutually exclusive")
                if "parameters" in decl:
                    _check_schema(decl["parameters"], f"tools[{t}].function_declarations[{d}].parameters")
                if not re.match(r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}$", decl.get("name", "")):
                    raise Invalid(f"* GenerateContentRequest.tools[{t}].function_declarations[{d}].name: Invalid "
                                  "function name.")

    # -- caching ------------------------------------------------------------------------------
    def _prompt(self, body: dict) -> str:
        texts = []
        si = _get(body, "systemInstruction")
        for p in (si or {}).get("parts") or []:
            texts.append(p.get("text", ""))
        for c in _get(body, "contents"):
            for p in c["parts"]:
                texts.append(p["text"] if "text" in p else json.dumps(p, sort_keys=True))
        return "\n".join(texts)

    def _cached(self, model: str, prompt: str) -> int:
        toks = tokens_of(prompt)
        minimum = MODELS[model]
        cached = 0
        n = minimum
        while n <= toks:
            h = hashlib.sha256((model + prompt[: n * 4]).encode()).hexdigest()
            if h in self._prefixes:
                cached = n
            self._prefixes.add(h)
            n += 256
        return cached

    # -- answers ------------------------------------------------------------------------------
    def _reply(self, body: dict, s: Scripted | None = None) -> tuple[list[dict], str]:
        if s is not None and s.tool:
            return [{"functionCall": {"name": s.tool[0], "args": s.tool[1]}}], "STOP"
        if s is not None and s.text is not None:
            return [{"text": s.text}], "STOP"
        contents = _get(body, "contents")
        last = contents[-1]
        tools = _get(body, "tools") or []
        decls = [d for t in tools for d in (_get(t, "functionDeclarations") or [])]
        fcc = (_get(body, "toolConfig") or {}).get("functionCallingConfig") or {}
        mode = fcc.get("mode", "AUTO")
        responses = [p for p in last["parts"] if _get(p, "functionResponse") is not None]
        if decls and mode != "NONE" and not responses:
            name = (fcc.get("allowedFunctionNames") or [decls[0]["name"]])[0]
            decl = next(d for d in decls if d["name"] == name)
            schema = _get(decl, "parametersJsonSchema") or decl.get("parameters") or {}
            return [{"functionCall": {"name": name, "args": tool_args(schema)}}], "STOP"
        if responses:
            r = _get(responses[0], "functionResponse")["response"]
            text = "The tool said: " + (r.get("content") if isinstance(r.get("content"), str) else json.dumps(r))
        else:
            bits = []
            for p in last["parts"]:
                if "text" in p:
                    bits.append(p["text"])
                elif _get(p, "inlineData") is not None:
                    d = _get(p, "inlineData")
                    bits.append(f"[image {_get(d, 'mimeType')} {len(base64.b64decode(d['data']))} bytes]")
            text = "echo: " + " ".join(bits)
        gen = _get(body, "generationConfig") or {}
        if _get(gen, "responseMimeType") == "application/json" and not responses:
            schema = _get(gen, "responseJsonSchema") or _get(gen, "responseSchema") or {"type": "object"}
            return [{"text": json.dumps(instance(schema))}], "STOP"
        for s in _get(gen, "stopSequences") or []:
            if s in text:
                text = text[: text.index(s)]
        words = text.split(" ")
        mx = _get(gen, "maxOutputTokens")
        if mx and len(words) > mx:
            return [{"text": " ".join(words[:mx])}], "MAX_TOKENS"
        return [{"text": text}], "STOP"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        rec = {"path": request.path, "query": dict(request.query), "headers": dict(request.headers), "raw": raw,
               "time": time.time()}
        self.requests.append(rec)
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return gemini_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers (callers without "
                                "established identity). Please use API Key or other form of API consumer identity "
                                "to call this API.")
        if key != self.api_key:
            return gemini_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        model, _, action = request.match_info["target"].partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return gemini_error(404, "NOT_FOUND", f"unknown method {action}")
        if model not in MODELS:
            return gemini_error(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not "
                                "supported for generateContent. Call ListModels to see the list of available models "
                                "and their supported methods.")
        stream = action == "streamGenerateContent"
        if stream and request.query.get("alt") != "sse":
            return gemini_error(400, "INVALID_ARGUMENT", "this mock serves streams with alt=sse only")
        try:
            body = json.loads(raw)
        except ValueError:
            return gemini_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
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
            self._validate(body)
        except Invalid as e:
            return gemini_error(e.status, e.code, str(e))
        prompt = self._prompt(body)
        cached = self._cached(model, prompt)
        p_tokens = tokens_of(prompt)
        usage = {"promptTokenCount": p_tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": p_tokens}]}
        if cached:
            usage["cachedContentTokenCount"] = cached
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
        rid = hashlib.md5(f"{time.time()}{len(self.requests)}".encode()).hexdigest()[:22]
        if "BLOCK_PROMPT" in prompt:
            obj = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
                   "usageMetadata": {**usage, "totalTokenCount": p_tokens}, "modelVersion": model, "responseId": rid}
            return await self._send(request, [obj], stream, s)
        if "BLOCK_ANSWER" in prompt:
            cands = [{"content": {"role": "model"}, "finishReason": "SAFETY", "index": 0, "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]}]
            obj = {"candidates": cands, "usageMetadata": {**usage, "totalTokenCount": p_tokens},
                   "modelVersion": model, "responseId": rid}
            return await self._send(request, [obj], stream, s)
        parts, finish = self._reply(body, s)
        n = (_get(body, "generationConfig") or {}).get("candidateCount") or 1
        out_tokens = max(1, sum(len(p.get("text", json.dumps(p)).split()) for p in parts)) * n
        thoughts = 0 if model.endswith("lite") else 7
        final_usage = {**usage, "candidatesTokenCount": out_tokens, "totalTokenCount": p_tokens + out_tokens + thoughts}
        if thoughts:
            final_usage["thoughtsTokenCount"] = thoughts
        if not stream:
            cands = [{"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": i}
                     for i in range(n)]
            return web.json_response({"candidates": cands, "usageMetadata": final_usage, "modelVersion": model,
                                      "responseId": rid})
        chunks = []
        if "text" in parts[0]:
            words = parts[0]["text"].split(" ")
            for k, w in enumerate(words):
                chunks.append({"candidates": [{"content": {"parts": [{"text": w if k == 0 else " " + w}],
                                                           "role": "model"}, "index": 0}],
                               "usageMetadata": {**usage, "totalTokenCount": p_tokens}, "modelVersion": model,
                               "responseId": rid})
            chunks[-1]["candidates"][0]["finishReason"] = finish
        else:
            chunks.append({"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish,
                                           "index": 0}], "modelVersion": model, "responseId": rid})
        chunks[-1]["usageMetadata"] = final_usage
        return await self._send(request, chunks, True, s)

    async def _send(self, request, chunks: list[dict], stream: bool, s: Scripted | None):
        if not stream:
            return web.json_response(chunks[0])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.active_streams += 1
        try:
            for i, c in enumerate(chunks):
                if s is not None and s.cut_after is not None and i >= s.cut_after:
                    request.transport.close()
                    return resp
                if s is not None and s.error_after is not None and i >= s.error_after:
                    await resp.write(b"data: " + json.dumps({"error": {"code": 500, "message": "An internal error "
                                     "has occurred.", "status": "INTERNAL"}}).encode() + b"\r\n\r\n")
                    return resp
                await resp.write(b"data: " + json.dumps(c).encode() + b"\r\n\r\n")
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled_streams += 1
            raise
        finally:
            self.active_streams -= 1
        return resp
