"""AWS Bedrock Converse / ConverseStream for `aws/*` models under the OpenAI chat schema.

Pure translations (`to_converse_body`, `to_chat_completion`, `ConverseStreamTranslator`) plus
what Bedrock needs around them, all from botocore rather than our own code:
- SigV4 signing (`botocore.auth.SigV4Auth`), with credentials from the gateway environment's
  `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else botocore's default chain
  (profile, SSO, container or instance role). The chain may do network I/O, so `prepare` resolves
  and refreshes credentials in a thread, never on the event loop.
- the binary event stream (`botocore.eventstream.EventStreamBuffer`, which checks the CRCs).
`cache_control` becomes a `cachePoint` block after the marked content, for models that support
prompt caching (others reject cachePoint). Usage: Bedrock's `inputTokens` excludes cache reads and
writes, so `prompt_tokens` = input + cacheRead + cacheWrite, `cached_tokens` = cacheRead.
Meta and Mistral models do not support tool use in ConverseStream: a streamed request with tools
for them goes to Converse, and the translator turns the one answer into chunks.
Tools: Bedrock refuses toolUse/toolResult blocks without a toolConfig, so a follow-up that leaves
`tools` out gets a placeholder tool (as LiteLLM does). Converse has no "none" tool choice: with
`tool_choice: "none"` the tools are left out, unless the conversation already holds tool blocks
(then they stay declared, and the model may still call one). `required` and a named tool are
refused here for the models whose Converse support lacks them (Bedrock's ToolChoice reference).
A JSON `response_format` is a forced tool (JSON_TOOL) whose input comes back as the message's
content, for the families that take a named toolChoice; a 400 for the others.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from urllib.parse import quote

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, ParserError

from common.asgi import NO_RETRY, HTTPError

from ..catalog import Route
from .base import (EMPTY_TEXT, JSON_TOOL, bad_request, cached_usage, data_url, Endpoint, error_event, error_text, function_tools,
                   json_format, json_tool_check, scrub, ToolCallChunks, UpstreamRequest, image_url, tool_call)

SERVICE = "bedrock"
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length",
          "model_context_window_exceeded": "length", "guardrail_intervened": "content_filter",
          "content_filtered": "content_filter"}
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                  "image/webp": "webp"}
# Model families (ids without a cross-region prefix) by what their Converse support lacks or has:
# no tool use while streaming (AWS's model feature table); toolChoice `any` and `tool` (ToolChoice).
_NO_STREAM_TOOLS = ("meta.", "mistral.")
READS_WHOLE_ANSWERS = True   # the stream translator also reads a Converse JSON answer (asked for where
#                              Bedrock cannot stream tool calls): the pipeline lets application/json through
_CHOICE_ANY = ("anthropic.", "mistral.mistral-large", "amazon.nova")
_CHOICE_TOOL = ("anthropic.", "amazon.nova")
_REGION_PREFIXES = ("us.", "eu.", "apac.", "us-gov.", "global.", "jp.", "au.", "sa.", "amer.")
_PLACEHOLDER_TOOL = {"toolSpec": {"name": "dummy_tool", "description": "Placeholder: Bedrock needs a tool "
                                  "declared when the conversation holds tool calls. Never call it.",
                                  "inputSchema": {"json": {"type": "object", "properties": {}}}}}
_CACHE_POINT = {"cachePoint": {"type": "default"}}
_MISSING = ("has no credentials on this gateway: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(+ AWS_SESSION_TOKEN), or AWS_PROFILE, or give it an IAM role")


# -- region and credentials -----------------------------------------------------------------
def sdk_region(env: Mapping[str, str]) -> str | None:
    """The region as the AWS SDKs find it: AWS_REGION, AWS_DEFAULT_REGION, then the region of the
    profile (AWS_PROFILE, else default) in the config file (AWS_CONFIG_FILE, else ~/.aws/config).
    It reads a file: for start-up (make_endpoint), not the event loop."""
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        return region
    import botocore.session
    from botocore.exceptions import BotoCoreError
    session = botocore.session.Session(profile=env.get("AWS_PROFILE") or "default")
    if env.get("AWS_CONFIG_FILE"):
        session.set_config_variable("config_file", env["AWS_CONFIG_FILE"])
    try:
        return session.get_scoped_config().get("region") or None
    except BotoCoreError:     # no such profile, an unreadable file
        return None


def _resolve(ep: Endpoint):
    """Static keys from the gateway's environment, else botocore's default chain (may block)."""
    env = ep.extra.get("aws_env") or {}
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN"))
    import botocore.session
    session = botocore.session.Session(profile=env.get("AWS_PROFILE") or None)
    return session.get_credentials()


async def prepare(ep: Endpoint) -> None:
    """Make sure `ep` holds current credentials, resolving or refreshing them off the event loop."""
    x = ep.extra
    creds = x.get("aws_creds")
    if creds is None:
        if x.get("aws_none_until", 0) > time.monotonic():
            raise _missing(ep)
        creds = await asyncio.to_thread(_resolve, ep)
        if creds is None:
            x["aws_none_until"] = time.monotonic() + 30.0
            raise _missing(ep)
        x["aws_creds"] = creds
    refresh = getattr(creds, "refresh_needed", None)   # RefreshableCredentials (roles, SSO, ...)
    if refresh is not None and refresh():
        x["aws_frozen"] = await asyncio.to_thread(creds.get_frozen_credentials)
    else:
        x["aws_frozen"] = creds.get_frozen_credentials()


def _missing(ep: Endpoint) -> HTTPError:
    return HTTPError(503, f"The provider '{ep.provider}' {_MISSING}.",
                     code="provider_not_configured", type="service_unavailable",
                     headers=[NO_RETRY])


def sign(ep: Endpoint, path: str, body: bytes, accept: str | None = None) -> list[tuple[bytes, bytes]]:
    """SigV4 headers for one POST of `body` to `path` (already URI-encoded) on `ep`."""
    creds = ep.extra.get("aws_frozen")
    if creds is None:
        raise _missing(ep)
    headers = {"Content-Type": "application/json"}
    if accept:
        headers["Accept"] = accept
    req = AWSRequest(method="POST", url=ep.target.url(path), data=body, headers=headers)
    SigV4Auth(creds, SERVICE, ep.region or "us-east-1").add_auth(req)
    return [(k.lower().encode(), v.encode() if type(v) is str else v) for k, v in req.headers.items()]


# -- request --------------------------------------------------------------------------------
def _text_block(text: str) -> dict:
    return {"text": text}


def _image_block(part: dict, param: str) -> dict:
    media, data = data_url(image_url(part), param,
                           "Bedrock models take images inline: send image_url.url as a data: URL")
    fmt = _IMAGE_FORMATS.get(media)
    if fmt is None:
        raise bad_request(f"{param}: images must be base64 data URLs of type png, jpeg, gif or webp.", param)
    return {"image": {"format": fmt, "source": {"bytes": data}}}


def _blocks(content, param: str, cache: bool, media: bool = True) -> list[dict]:
    """OpenAI content -> Converse blocks; blank text is left out (Converse refuses it)."""
    if type(content) is str:
        return [{"text": content}] if content.strip() else []
    if content is None:
        return []
    if type(content) is not list:
        raise bad_request(f"{param}.content must be a string or a list of content parts.", f"{param}.content")
    out = []
    for j, part in enumerate(content):
        p = f"{param}.content[{j}]"
        t = part.get("type") if type(part) is dict else None
        if t == "text":
            if not str(part.get("text") or "").strip():
                continue
            out.append({"text": part["text"]})
        elif t == "image_url" and media:
            out.append(_image_block(part, p))
        else:
            raise bad_request(f"{p}: content part type {t!r} is not supported here.", p)
        if cache and part.get("cache_control"):
            out.append(_CACHE_POINT)
    return out


def _tool_use(call: dict, param: str) -> dict:
    name, inp = tool_call(call, param)
    return {"toolUse": {"toolUseId": call.get("id") or "tooluse_missing", "name": name, "input": inp}}


def _tool_result(m: dict, param: str) -> dict:
    tid = m.get("tool_call_id")
    if not tid:
        raise bad_request(f"{param}.tool_call_id is required for role 'tool'.", f"{param}.tool_call_id")
    content = m.get("content")
    if type(content) is list:
        content = "".join(x.get("text", "") for x in content if type(x) is dict)
    return {"toolResult": {"toolUseId": tid, "content": [{"text": content if (content or "").strip() else EMPTY_TEXT}]}}


def _messages(msgs: list, out: dict, cache: bool) -> None:
    system: list[dict] = []
    turns: list[dict] = []
    for i, m in enumerate(msgs):
        role = m.get("role")
        p = f"messages[{i}]"
        mark = cache and bool(m.get("cache_control"))
        if role == "user":
            blocks = _blocks(m.get("content"), p, cache)
        elif role == "assistant":
            blocks = _blocks(m.get("content"), p, cache, media=False)
            blocks += [_tool_use(c, f"{p}.tool_calls[{k}]") for k, c in enumerate(m.get("tool_calls") or ())]
            if not blocks:
                continue
        elif role == "tool":
            role = "user"
            blocks = [_tool_result(m, p)]
        elif role in ("system", "developer"):
            system += _blocks(m.get("content"), p, cache, media=False)
            if mark and system and system[-1] is not _CACHE_POINT:
                system.append(_CACHE_POINT)
            continue
        else:
            raise bad_request(f"{p}.role {role!r} is not supported; use system, user, assistant or tool.", f"{p}.role")
        if mark and blocks and blocks[-1] is not _CACHE_POINT:
            blocks.append(_CACHE_POINT)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] != "user":
        raise bad_request("Bedrock conversations must start with a user message (after any system messages).",
                   "messages")
    for t in turns:   # an empty user message (OpenAI takes one; Converse refuses empty content)
        if not t["content"]:
            t["content"] = [{"text": EMPTY_TEXT}]
    if system:
        out["system"] = system
    out["messages"] = turns


def _family(model_id: str) -> str:
    """A model id without its cross-region inference prefix (us.anthropic.x -> anthropic.x)."""
    head, dot, rest = model_id.partition(".")
    return rest if dot and head + "." in _REGION_PREFIXES else model_id


def _tool_choice(route: Route, choice) -> dict | None:
    """Converse's toolChoice for OpenAI's tool_choice; None: Converse's default, auto."""
    if choice in (None, "auto", "none"):
        return None
    family = _family(route.model.model)
    if choice == "required":
        if family.startswith(_CHOICE_ANY):
            return {"any": {}}
        raise bad_request(f"tool_choice 'required' is not supported for '{route.name}': Bedrock offers it for "
                          "Anthropic, Mistral Large and Amazon Nova models only; use 'auto'.", "tool_choice")
    if type(choice) is dict and type(choice.get("function")) is dict and choice["function"].get("name"):
        if family.startswith(_CHOICE_TOOL):
            return {"tool": {"name": choice["function"]["name"]}}
        raise bad_request(f"a named tool_choice is not supported for '{route.name}': Bedrock offers it for "
                          "Anthropic and Amazon Nova models only; use 'auto'.", "tool_choice")
    raise bad_request("tool_choice must be 'auto', 'required', 'none' or {'type': 'function', 'function': "
               "{'name': ...}}.", "tool_choice")


def _tools(route: Route, body: dict, out: dict) -> None:
    tools = function_tools(body)
    choice = body.get("tool_choice")
    history = any("toolUse" in b or "toolResult" in b for t in out["messages"] for b in t["content"])
    if tools and (choice != "none" or history):
        specs = []
        for k, fn in tools:
            spec = {"name": fn["name"],
                    "inputSchema": {"json": fn.get("parameters") or {"type": "object", "properties": {}}}}
            if fn.get("description"):
                spec["description"] = fn["description"]
            specs.append({"toolSpec": spec})
    elif history:
        specs = [_PLACEHOLDER_TOOL]
    else:
        return
    out["toolConfig"] = {"tools": specs}
    tc = _tool_choice(route, choice) if tools else None
    if tc:
        out["toolConfig"]["toolChoice"] = tc


def _response_format(route: Route, body: dict, schema: dict, out: dict) -> None:
    """A JSON response_format as a forced tool whose input is the answer, for the model families
    whose Converse support takes a named toolChoice; refused for the others."""
    if not _family(route.model.model).startswith(_CHOICE_TOOL):
        raise bad_request(f"response_format {body['response_format']['type']!r} is not supported for '{route.name}': "
                          "the gateway gives it to Bedrock models as a forced tool, which Bedrock offers for "
                          "Anthropic and Amazon Nova models only. Ask for JSON in the prompt instead.",
                          "response_format")
    json_tool_check(route.name, body, schema)
    spec = {"toolSpec": {"name": JSON_TOOL, "description": "Give the answer as this tool's input.",
                         "inputSchema": {"json": schema}}}
    tc = out.setdefault("toolConfig", {"tools": []})
    tc["tools"] = [*tc["tools"], spec]
    tc["toolChoice"] = {"tool": {"name": JSON_TOOL}}


def to_converse_body(route: Route, body: dict) -> dict:
    if body.get("n") not in (None, 1):
        raise bad_request(f"n={body['n']} is not supported for '{route.name}': Bedrock models return one choice.", "n")
    schema = json_format(body)
    out: dict = {}
    _messages(body["messages"], out, route.model.supports_prompt_caching)
    cfg: dict = {}
    mt = body.get("max_completion_tokens") or body.get("max_tokens")
    if mt:
        cfg["maxTokens"] = mt
    if body.get("temperature") is not None:
        cfg["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        cfg["topP"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        cfg["stopSequences"] = [stop] if type(stop) is str else list(stop)
    if cfg:
        out["inferenceConfig"] = cfg
    _tools(route, body, out)
    if schema is not None:
        _response_format(route, body, schema, out)
    if body.get("top_k") is not None:
        out["additionalModelRequestFields"] = {"top_k": body["top_k"]}
    return out


def streams_tools(model_id: str) -> bool:
    return not _family(model_id).startswith(_NO_STREAM_TOOLS)


def build(ep: Endpoint, route: Route, op: str, body: dict, stream: bool) -> UpstreamRequest:
    if op != "chat":
        raise bad_request(f"'{route.name}' is a Bedrock model: it serves /chat/completions only.", "model")
    conv = to_converse_body(route, body)
    model = route.model.model
    use_stream = stream and ("toolConfig" not in conv or streams_tools(model))
    path = f"/model/{quote(model, safe='')}/{'converse-stream' if use_stream else 'converse'}"
    data = orjson.dumps(conv)
    headers = sign(ep, path, data, "application/vnd.amazon.eventstream" if use_stream else None)
    return UpstreamRequest(path, headers, data)


# -- response -------------------------------------------------------------------------------
def usage_of(u: dict | None) -> dict:
    u = u or {}
    return cached_usage(u.get("inputTokens") or 0, u.get("cacheReadInputTokens") or 0,
                        u.get("cacheWriteInputTokens") or 0, u.get("outputTokens") or 0)


def _new_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


def to_chat_completion(obj: dict, model: str) -> dict:
    text: list[str] = []
    thinking: list[str] = []
    calls = []
    for b in ((obj.get("output") or {}).get("message") or {}).get("content") or ():
        if "text" in b:
            text.append(b["text"])
        elif "toolUse" in b and b["toolUse"].get("name") == JSON_TOOL:    # a response_format's answer
            text.append(orjson.dumps(b["toolUse"].get("input") or {}).decode())
        elif "toolUse" in b:
            tu = b["toolUse"]
            calls.append({"id": tu.get("toolUseId"), "type": "function",
                          "function": {"name": tu.get("name"), "arguments": orjson.dumps(tu.get("input") or {}).decode()}})
        elif "reasoningContent" in b:
            thinking.append(((b["reasoningContent"] or {}).get("reasoningText") or {}).get("text", ""))
    msg: dict = {"role": "assistant", "content": "".join(text) if text else None}
    if calls:
        msg["tool_calls"] = calls
    if thinking:
        msg["reasoning_content"] = "".join(thinking)
    return {"id": _new_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None,
                         "finish_reason": "stop" if obj.get("stopReason") == "tool_use" and not calls
                         else FINISH.get(obj.get("stopReason"), "stop")}],
            "usage": usage_of(obj.get("usage"))}


def parse(route: Route, op: str, data: bytes) -> dict:
    obj = orjson.loads(data)
    if type(obj) is not dict or "output" not in obj:
        raise ValueError("upstream response is not a Converse response")
    return to_chat_completion(obj, route.model.model)


def error_message(status: int, data: bytes) -> str:
    """AWS's signature errors quote the canonical request, whose headers include the session
    token: only the first sentence part goes on."""
    text = error_text(data)
    cut = text.find("The Canonical String")
    return (text[:cut].rstrip() if cut >= 0 else text).split("x-amz-security-token")[0]


# -- stream ---------------------------------------------------------------------------------
class ConverseStreamTranslator(ToolCallChunks):
    """ConverseStream events (binary event stream) -> OpenAI chat.completion.chunk events.

    A Converse (non-stream) JSON answer is recognised by its first byte, `{` (an event-stream
    message starts with its 4-byte length, far below 0x7b000000): it is read whole and sent as
    chunks when it ends.
    """

    __slots__ = ("usage", "template", "error", "_buf", "_whole", "_head", "_tools", "_argless", "_json", "_model")

    def __init__(self, model: str) -> None:
        self.usage: dict | None = None
        self.error: str | None = None
        self._model = model
        self.template = {"id": _new_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "choices": []}
        self._head = orjson.dumps({k: self.template[k] for k in ("id", "object", "created", "model")})[:-1] + b","
        self._buf: EventStreamBuffer | None = None
        self._whole: list[bytes] | None = None   # a Converse (non-stream) answer, read whole
        self._tools: dict[int, int] = {}      # content block index -> OpenAI tool_calls index
        self._argless: set[int] = set()       # tool blocks open with no argument sent yet
        self._json: set[int] = set()          # blocks of the forced tool carrying response_format

    def _fail(self, kind: str, message: str, out: list[bytes]) -> None:
        message = scrub(message)
        self.error = f"{kind}: {message}"
        out.append(error_event(f"Bedrock stream error ({kind}): {message}", kind))

    def _event(self, kind: str, ev: dict, out: list[bytes]) -> None:
        if kind == "contentBlockDelta":
            d = ev.get("delta") or {}
            if "text" in d:
                out.append(self._chunk(b'{"content":' + orjson.dumps(d["text"]) + b"}"))
            elif "toolUse" in d:
                self._tool_piece(ev.get("contentBlockIndex"), d["toolUse"].get("input"), out)
            elif "reasoningContent" in d:
                t = (d["reasoningContent"] or {}).get("text")
                if t:
                    out.append(self._chunk(b'{"reasoning_content":' + orjson.dumps(t) + b"}"))
        elif kind == "messageStart":
            out.append(self._chunk(b'{"role":"assistant","content":""}'))
        elif kind == "contentBlockStart":
            tu = (ev.get("start") or {}).get("toolUse")
            if tu:
                self._tool_start(ev.get("contentBlockIndex"), tu.get("toolUseId"), tu.get("name"), out)
        elif kind == "contentBlockStop":
            self._block_stop(ev.get("contentBlockIndex"), out)
        elif kind == "messageStop":
            fin = self._finish_reason(FINISH.get(ev.get("stopReason"), "stop"))
            out.append(self._chunk(b"{}", b'"' + fin.encode() + b'"'))
        elif kind == "metadata":
            self.usage = usage_of(ev.get("usage"))

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self.error:
            return out   # after an error nothing more is relayed
        try:
            self._feed(data, out)
        except (ParserError, ValueError, KeyError, TypeError, AttributeError) as e:
            self._fail("bad_upstream_response", f"the event stream could not be read: {e!r}", out)
        return out

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        if self._whole is not None:
            self._whole.append(data)
            return
        if self._buf is None:
            if data[:1] == b"{":
                self._whole = [data]
                return
            self._buf = EventStreamBuffer()
        self._buf.add_data(data)
        for msg in self._buf:
            h = msg.headers
            mtype = h.get(":message-type")
            if mtype == "event":
                self._event(h.get(":event-type", ""), orjson.loads(msg.payload) if msg.payload else {}, out)
            elif mtype == "exception" or mtype == "error":
                kind = h.get(":exception-type") or h.get(":error-code") or "error"
                try:
                    message = orjson.loads(msg.payload).get("message", "")
                except (orjson.JSONDecodeError, AttributeError):
                    message = msg.payload.decode("utf-8", "replace")
                self._fail(kind, message or h.get(":error-message", ""), out)

    def close(self) -> list[bytes]:
        if self._whole is None or self.error:
            return []
        try:
            obj = to_chat_completion(orjson.loads(b"".join(self._whole)), self._model)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            out: list[bytes] = []
            self._fail("bad_upstream_response", f"the Converse answer could not be read: {e}", out)
            return out
        self._whole = None
        msg = obj["choices"][0]["message"]
        out = [self._chunk(b'{"role":"assistant","content":""}')]
        if msg.get("content"):
            out.append(self._chunk(b'{"content":' + orjson.dumps(msg["content"]) + b"}"))
        for k, c in enumerate(msg.get("tool_calls") or ()):
            out.append(self._chunk(b'{"tool_calls":[' + orjson.dumps({"index": k, **c}) + b"]}"))
        out.append(self._chunk(b"{}", b'"' + obj["choices"][0]["finish_reason"].encode() + b'"'))
        self.usage = obj["usage"]
        return out


def stream(route: Route, op: str) -> ConverseStreamTranslator:
    return ConverseStreamTranslator(route.model.model)
