"""Google Gemini API (`generateContent`, `streamGenerateContent?alt=sse`) under the OpenAI chat schema.

Pure translations, no I/O:
- `to_gemini_body`: roles (assistant -> model), system and developer messages ->
  `systemInstruction`, data-URL images -> `inlineData`, tools -> `functionDeclarations` (with
  `parametersJsonSchema`, which takes OpenAI's JSON Schema as it is), tool calls and tool results ->
  `functionCall` / `functionResponse` parts (a result finds its function name through the
  assistant turn that made the call), `generationConfig` (temperature, top_p, top_k, max output
  tokens, stop, n, seed, penalties, response_format, reasoning_effort -> thinking budget).
  Consecutive same-role turns are merged (parallel function responses must share one turn).
  Empty text parts are left out; a user turn left with no part says "(empty)" (Gemini refuses
  empty `parts`, OpenAI takes an empty message).
- `to_chat_completion`: a GenerateContentResponse -> an OpenAI chat completion; safety and
  other blocks become `finish_reason: "content_filter"`.
- `GeminiStream`: SSE GenerateContentResponse chunks -> OpenAI chunks.
Usage: `promptTokenCount` already includes `cachedContentTokenCount` (-> `cached_tokens`);
thinking tokens count as completion tokens, as OpenAI counts reasoning tokens.
"""
from __future__ import annotations

import os
import time

import orjson


from ..catalog import Route
from ..sse import SSESplitter, parse_event
from .base import (EMPTY_TEXT, bad_request, data_url, Endpoint, error_event, error_text, function_tools, scrub, SSETranslator,
                   UpstreamRequest, file_data, image_url, tool_call)

API = "/v1beta"      # the default; a provider's `api_version` in models.yaml (e.g. v1) overrides it

FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
          "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
          "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter"}
_THINKING = {"minimal": 512, "low": 1024, "medium": 8192, "high": 24576}


def _call_id() -> str:
    return "call_" + os.urandom(12).hex()


# -- request --------------------------------------------------------------------------------
def _image_part(part: dict, param: str) -> dict:
    media, data = data_url(image_url(part), param,
                           "Gemini models take images inline: send image_url.url as a data: URL")
    return {"inlineData": {"mimeType": media, "data": data}}


def _parts(content, param: str) -> list[dict]:
    if type(content) is str:
        return [{"text": content}] if content else []
    if content is None:
        return []
    if type(content) is not list:
        raise bad_request(f"{param}.content must be a string or a list of content parts.", f"{param}.content")
    out = []
    for j, part in enumerate(content):
        p = f"{param}.content[{j}]"
        t = part.get("type") if type(part) is dict else None
        if t == "text":
            if part.get("text"):
                out.append({"text": part["text"]})
        elif t == "image_url":
            out.append(_image_part(part, p))
        elif t == "file":
            media, b64 = file_data(part, p)
            out.append({"inlineData": {"mimeType": media, "data": b64}})
        else:
            raise bad_request(f"{p}: content part type {t!r} is not supported here.", p)
    return out


def _contents(msgs: list, out: dict) -> None:
    system: list[dict] = []
    contents: list[dict] = []
    names: dict[str, str] = {}   # tool_call_id -> function name
    for i, m in enumerate(msgs):
        role = m.get("role")
        p = f"messages[{i}]"
        if role == "user":
            parts = _parts(m.get("content"), p)
        elif role == "assistant":
            role = "model"
            parts = _parts(m.get("content"), p)
            for k, c in enumerate(m.get("tool_calls") or ()):
                name, args = tool_call(c, f"{p}.tool_calls[{k}]")
                if c.get("id"):
                    names[c["id"]] = name
                parts.append({"functionCall": {"name": name, "args": args}})
            if not parts:
                continue
        elif role == "tool":
            role = "user"
            tid = m.get("tool_call_id")
            name = names.get(tid) or m.get("name")
            if not name:
                raise bad_request(f"{p}.tool_call_id {tid!r} does not match a tool call of an earlier assistant "
                           "message.", f"{p}.tool_call_id")
            content = m.get("content")
            if type(content) is list:
                content = "".join(x.get("text", "") for x in content if type(x) is dict)
            resp = None
            if type(content) is str and content[:1] == "{":
                try:
                    resp = orjson.loads(content)
                except orjson.JSONDecodeError:
                    resp = None
            if type(resp) is not dict:
                resp = {"content": content}
            parts = [{"functionResponse": {"name": name, "response": resp}}]
        elif role in ("system", "developer"):
            system += _parts(m.get("content"), p)
            continue
        else:
            raise bad_request(f"{p}.role {role!r} is not supported; use system, user, assistant or tool.", f"{p}.role")
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        else:
            contents.append({"role": role, "parts": parts})
    if not contents:
        raise bad_request("messages must contain at least one user message besides system messages.", "messages")
    for c in contents:   # an empty user message: OpenAI takes it, Gemini refuses empty parts
        if not c["parts"]:
            c["parts"] = [{"text": EMPTY_TEXT}]
    if system:
        out["systemInstruction"] = {"parts": system}
    out["contents"] = contents


def _tools(body: dict, out: dict) -> None:
    tools = function_tools(body)
    if not tools:
        return
    decls = []
    for k, fn in tools:
        d = {"name": fn["name"]}
        if fn.get("description"):
            d["description"] = fn["description"]
        if fn.get("parameters"):
            d["parametersJsonSchema"] = fn["parameters"]
        decls.append(d)
    out["tools"] = [{"functionDeclarations": decls}]
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return
    if choice == "required":
        cfg = {"mode": "ANY"}
    elif choice == "none":
        cfg = {"mode": "NONE"}
    elif type(choice) is dict and type(choice.get("function")) is dict and choice["function"].get("name"):
        cfg = {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    else:
        raise bad_request("tool_choice must be 'auto', 'required', 'none' or {'type': 'function', 'function': "
                   "{'name': ...}}.", "tool_choice")
    out["toolConfig"] = {"functionCallingConfig": cfg}


def _generation_config(body: dict) -> dict:
    g: dict = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"), ("seed", "seed"),
                     ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                     ("n", "candidateCount")):
        v = body.get(src)
        if v is not None:
            g[dst] = v
    mt = body.get("max_completion_tokens") or body.get("max_tokens")
    if mt:
        g["maxOutputTokens"] = mt
    stop = body.get("stop")
    if stop:
        g["stopSequences"] = [stop] if type(stop) is str else list(stop)
    rf = body.get("response_format")
    if type(rf) is dict:
        if rf.get("type") == "json_object":
            g["responseMimeType"] = "application/json"
        elif rf.get("type") == "json_schema":
            g["responseMimeType"] = "application/json"
            schema = (rf.get("json_schema") or {}).get("schema")
            if schema:
                g["responseJsonSchema"] = schema
    effort = body.get("reasoning_effort")
    if effort in _THINKING:
        g["thinkingConfig"] = {"thinkingBudget": _THINKING[effort]}
    return g


def to_gemini_body(route: Route, body: dict) -> dict:
    out: dict = {}
    _contents(body["messages"], out)
    _tools(body, out)
    g = _generation_config(body)
    if g:
        out["generationConfig"] = g
    return out


def build(ep: Endpoint, route: Route, op: str, body: dict, stream: bool) -> UpstreamRequest:
    if op != "chat":
        raise bad_request(f"'{route.name}' is a Gemini model: it serves /chat/completions only.", "model")
    h = ep.extra.get("headers")
    if h is None:
        h = [(b"content-type", b"application/json")]
        if ep.api_key:
            h.append((b"x-goog-api-key", ep.api_key.encode()))
        for k, v in ep.conf.headers.items():
            h.append((k.lower().encode(), v.encode()))
        ep.extra["headers"] = h
    model = route.model.model
    api = f"/{ep.conf.api_version}" if ep.conf.api_version else API
    path = f"{api}/models/{model}:streamGenerateContent?alt=sse" if stream else f"{api}/models/{model}:generateContent"
    return UpstreamRequest(path, h, orjson.dumps(to_gemini_body(route, body)))


# -- response -------------------------------------------------------------------------------
def usage_of(um: dict | None) -> dict:
    um = um or {}
    prompt = (um.get("promptTokenCount") or 0) + (um.get("toolUsePromptTokenCount") or 0)
    thoughts = um.get("thoughtsTokenCount") or 0
    completion = (um.get("candidatesTokenCount") or 0) + thoughts
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": um.get("totalTokenCount") or prompt + completion,
            "prompt_tokens_details": {"cached_tokens": um.get("cachedContentTokenCount") or 0},
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def _finish(reason: str | None, has_calls: bool) -> str | None:
    if reason is None:
        return None
    if has_calls and reason == "STOP":
        return "tool_calls"
    return FINISH.get(reason, "stop")


def _candidate(c: dict) -> tuple[str | None, str | None, list]:
    text: list[str] = []
    thoughts: list[str] = []
    calls = []
    for p in (c.get("content") or {}).get("parts") or ():
        if "text" in p:
            (thoughts if p.get("thought") else text).append(p["text"])
        elif "functionCall" in p:
            fc = p["functionCall"]
            calls.append({"id": fc.get("id") or _call_id(), "type": "function",
                          "function": {"name": fc.get("name"), "arguments": orjson.dumps(fc.get("args") or {}).decode()}})
    return ("".join(text) if text else None), ("".join(thoughts) if thoughts else None), calls


def to_chat_completion(obj: dict, model: str) -> dict:
    choices = []
    for i, c in enumerate(obj.get("candidates") or ()):
        text, thoughts, calls = _candidate(c)
        msg: dict = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = calls
        if thoughts:
            msg["reasoning_content"] = thoughts
        choices.append({"index": c.get("index", i), "message": msg, "logprobs": None,
                        "finish_reason": _finish(c.get("finishReason") or "STOP", bool(calls))})
    if not choices:
        # The prompt itself was blocked (promptFeedback.blockReason): no candidate at all.
        choices.append({"index": 0, "message": {"role": "assistant", "content": None}, "logprobs": None,
                        "finish_reason": "content_filter"})
    return {"id": obj.get("responseId") or "chatcmpl-" + os.urandom(12).hex(), "object": "chat.completion",
            "created": int(time.time()), "model": obj.get("modelVersion") or model, "choices": choices,
            "usage": usage_of(obj.get("usageMetadata"))}


def parse(route: Route, op: str, data: bytes) -> dict:
    obj = orjson.loads(data)
    if type(obj) is not dict:
        raise ValueError("upstream response is not a JSON object")
    return to_chat_completion(obj, route.model.model)


def error_message(status: int, data: bytes) -> str:
    return error_text(data)


# -- stream ---------------------------------------------------------------------------------
class GeminiStream(SSETranslator):
    """SSE GenerateContentResponse chunks -> OpenAI chat.completion.chunk events."""

    provider = "Gemini"
    __slots__ = ("_sse", "usage", "template", "error", "_model", "_head", "_calls", "_started")

    def __init__(self, model: str) -> None:
        self._sse = SSESplitter()
        self.usage: dict | None = None
        self.template: dict | None = None
        self.error: str | None = None
        self._model = model
        self._head = b""
        self._calls: dict[int, int] = {}    # candidate index -> tool calls sent so far
        self._started: set[int] = set()

    def _chunk(self, index: int, delta: dict, finish: str | None = None) -> bytes:
        return (b"data: " + self._head + b'"choices":[' + orjson.dumps(
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}) + b"]}\n\n")

    def _event(self, raw: bytes, out: list[bytes]) -> None:
        _, payload = parse_event(raw)
        if not payload:
            return
        obj = orjson.loads(payload)
        if type(obj) is not dict:
            return
        err = obj.get("error")
        if err:
            msg = scrub(str((err.get("message") if type(err) is dict else None) or err))
            self.error = msg
            out.append(error_event(f"Gemini stream error: {msg}", err.get("status") if type(err) is dict else None))
            return
        if self.template is None:
            self.template = {"id": obj.get("responseId") or "chatcmpl-" + os.urandom(12).hex(),
                             "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": obj.get("modelVersion") or self._model, "choices": []}
            self._head = orjson.dumps({k: self.template[k] for k in ("id", "object", "created", "model")})[:-1] + b","
        if obj.get("usageMetadata"):
            self.usage = usage_of(obj["usageMetadata"])
        cands = obj.get("candidates")
        if not cands:
            if (obj.get("promptFeedback") or {}).get("blockReason"):
                out.append(self._chunk(0, {"role": "assistant", "content": None}, "content_filter"))
            return
        for c in cands:
            i = c.get("index", 0)
            if i not in self._started:
                self._started.add(i)
                out.append(self._chunk(i, {"role": "assistant", "content": ""}))
            text, thoughts, calls = _candidate(c)
            if thoughts:
                out.append(self._chunk(i, {"reasoning_content": thoughts}))
            if text:
                out.append(self._chunk(i, {"content": text}))
            if calls:
                n = self._calls.get(i, 0)
                out.append(self._chunk(i, {"tool_calls": [{"index": n + k, **call} for k, call in enumerate(calls)]}))
                self._calls[i] = n + len(calls)
            fin = _finish(c.get("finishReason"), bool(self._calls.get(i)))
            if fin:
                out.append(self._chunk(i, {}, fin))


def stream(route: Route, op: str) -> GeminiStream:
    return GeminiStream(route.model.model)
