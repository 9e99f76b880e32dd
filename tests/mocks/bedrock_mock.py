"""A mock of Bedrock Runtime's Converse and ConverseStream on loopback.

It checks what the real service checks for what the gateway relies on:
- the SigV4 signature (recomputed with botocore from the raw path, the signed headers and the
  body, for service `bedrock` and the mock's region; a wrong key, region, body or path fails as
  AWS fails: 403 InvalidSignatureException / UnrecognizedClientException);
- the request body against botocore's own model of the Converse input (unknown fields, wrong
  types and missing required members are refused as ValidationException);
- Converse's rules: a conversation starts with a user message and alternates roles, messages are
  not empty and text blocks not blank, toolUse/toolResult need a toolConfig, Meta and Mistral
  models take no tools while streaming, toolChoice only as each model family supports it (any:
  Anthropic, Mistral Large, Nova; tool: Anthropic, Nova; Cohere none at all), cachePoint only for
  models with prompt caching, images only for vision models.
Answers are the documented ConverseResponse JSON and, for streams, the binary event stream
(messageStart, contentBlockStart, contentBlockDelta, contentBlockStop, messageStop, metadata)
encoded with tests/mocks/eventstream.py; a tool called without arguments gets no input delta.
Caching: the prefix before a cachePoint of at least 1,024 tokens is written once, read afterwards;
`inputTokens` excludes both.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import math
import re
import time
from urllib.parse import unquote

import botocore.session
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ParamValidationError
from botocore.validate import ParamValidator

from tests.mocks import eventstream
from tests.mocks.openai_mock import Scripted
from tests.mocks.schema_instance import tool_args

# model id -> (prompt caching, vision, tool use while streaming, toolChoice members taken)
_CLAUDE = (True, True, True, {"auto", "any", "tool"})
MODELS = {
    "meta.llama3-1-405b-instruct-v1:0": (False, False, False, {"auto"}),
    "meta.llama3-1-70b-instruct-v1:0": (False, False, False, {"auto"}),
    "meta.llama3-1-8b-instruct-v1:0": (False, False, False, {"auto"}),
    "cohere.command-r-plus-v1:0": (False, False, True, set()),
    "cohere.command-r-v1:0": (False, False, True, set()),
    "anthropic.claude-sonnet-4-5-20250929-v1:0": _CLAUDE,
    "us.anthropic.claude-sonnet-4-5-20250929-v1:0": _CLAUDE,
}
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})")
_MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "gif": b"GIF8", "webp": b"RIFF"}


def tokens_of(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class AwsError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind


def aws_error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status,
                             headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
                                      "x-amzn-RequestId": "00000000-mock"})


_model = botocore.session.get_session().get_service_model("bedrock-runtime")
_INPUT = {"converse": _model.operation_model("Converse").input_shape,
          "converse-stream": _model.operation_model("ConverseStream").input_shape}


class MockBedrock:
    def __init__(self, access_key: str = "AKIAMOCKBEDROCK00001", secret_key: str = "mock/secret+KEY0123456789abcdef",
                 region: str = "us-west-2"):
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.requests: list[dict] = []
        self.script: list[Scripted] = []
        self.chunk_delay = 0.0
        self._cache: set[str] = set()
        self.active_streams = 0
        self.cancelled_streams = 0
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/model/{model_id}/{action}", self.handle)
        self.url = ""

    def reset(self) -> None:
        self.requests.clear()
        self.script.clear()
        self.chunk_delay = 0.0
        self._cache.clear()
        self.cancelled_streams = 0

    # -- SigV4 --------------------------------------------------------------------------------
    def _verify(self, request: web.Request, raw: bytes) -> None:
        auth = request.headers.get("Authorization")
        if not auth:
            raise AwsError(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        m = _AUTH.fullmatch(auth)
        if not m:
            raise AwsError(403, "IncompleteSignatureException", "Authorization header requires 'Credential', "
                           "'Signature' and 'SignedHeaders' parameters.")
        akid, day, region, service, signed, signature = m.groups()
        if akid != self.access_key:
            raise AwsError(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
        amz_date = request.headers.get("X-Amz-Date", "")
        if region != self.region or service != "bedrock" or amz_date[:8] != day:
            raise AwsError(403, "InvalidSignatureException", f"Credential should be scoped to a valid region "
                           f"({self.region}) and service (bedrock).")
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        if abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) > 300:
            raise AwsError(403, "InvalidSignatureException", "Signature expired")
        names = signed.split(";")
        if "host" not in names:
            raise AwsError(403, "InvalidSignatureException", "'Host' must be a signed header")
        headers = {n: request.headers.get(n, "") for n in names}
        req = AWSRequest(method=request.method, url=f"http://{request.headers['Host']}{request.raw_path}", data=raw,
                         headers=headers)
        req.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(self.access_key, self.secret_key), "bedrock", self.region)
        expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        if expected != signature:
            raise AwsError(403, "InvalidSignatureException", "The request signature we calculated does not match the "
                           "signature you provided. Check your AWS Secret Access Key and signing method. Consult the "
                           "service documentation for details.")

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, model: str, action: str, body: dict) -> None:
        report = ParamValidator().validate({**body, "modelId": model}, _INPUT[action])
        if report.has_errors():
            raise AwsError(400, "ValidationException", str(ParamValidationError(report=report.generate_report())))
        caching, vision, stream_tools, choices = MODELS[model]
        msgs = body.get("messages") or []
        if not msgs or msgs[0]["role"] != "user":
            raise AwsError(400, "ValidationException", "A conversation must start with a user message. Try again "
                           "with a conversation that starts with a user message.")
        uses_tools = False
        for i, m in enumerate(msgs):
            if i and m["role"] == msgs[i - 1]["role"]:
                raise AwsError(400, "ValidationException", "A conversation must alternate between user and assistant "
                               "roles. Make sure the conversation alternates between user and assistant roles and "
                               "try again.")
            if not m["content"]:
                raise AwsError(400, "ValidationException", f"The content field in the Message object at messages.{i} "
                               "is empty. Add a ContentBlock object to the content field and try again.")
            for j, b in enumerate(m["content"]):
                if "text" in b and not b["text"].strip():
                    raise AwsError(400, "ValidationException", f"The text field in the ContentBlock object at "
                                   f"messages.{i}.content.{j} is blank. Add text to the text field, and try again.")
                if "toolUse" in b or "toolResult" in b:
                    uses_tools = True
                if "cachePoint" in b and not caching:
                    raise AwsError(400, "ValidationException", "You invoked an unsupported model or your request did "
                                   "not allow prompt caching. See the documentation for more information.")
                if "image" in b:
                    if not vision:
                        raise AwsError(400, "ValidationException", "This model doesn't support the image content "
                                       "block that you provided. Try again with a supported content block.")
                    img = b["image"]
                    data = base64.b64decode(img["source"]["bytes"])
                    if not data.startswith(_MAGIC[img["format"]]):
                        raise AwsError(400, "ValidationException", "The model returned the following errors: Could "
                                       "not process image")
        for b in body.get("system") or []:
            if "cachePoint" in b and not caching:
                raise AwsError(400, "ValidationException", "You invoked an unsupported model or your request did not "
                               "allow prompt caching. See the documentation for more information.")
        if uses_tools and not body.get("toolConfig"):
            raise AwsError(400, "ValidationException", "The toolConfig field must be defined when using toolUse and "
                           "toolResult content blocks.")
        if action == "converse-stream" and body.get("toolConfig") and not stream_tools:
            raise AwsError(400, "ValidationException", "This model doesn't support tool use in streaming mode.")
        for member in (body.get("toolConfig") or {}).get("toolChoice") or {}:
            if member not in choices:
                raise AwsError(400, "ValidationException", f"This model doesn't support the toolConfig.toolChoice."
                               f"{member} field. Remove toolConfig.toolChoice.{member} and try again.")

    # -- caching ------------------------------------------------------------------------------
    def _usage(self, model: str, body: dict, out_tokens: int) -> dict:
        blocks = list(body.get("system") or [])
        for m in body["messages"]:
            blocks += m["content"]
        total = read = write = upto = 0
        h = hashlib.sha256(model.encode())
        for b in blocks:
            if "cachePoint" in b:
                if upto >= 1024:
                    key = h.hexdigest()
                    if key in self._cache:
                        read = upto
                    else:
                        self._cache.add(key)
                        write = upto - read
                continue
            t = b["text"] if "text" in b else json.dumps(b, sort_keys=True)
            n = tokens_of(t)
            h.update(t.encode())
            upto += n
            total += n
        u = {"inputTokens": total - read - write, "outputTokens": out_tokens,
             "totalTokens": total + out_tokens}
        if MODELS[model][0]:
            u["cacheReadInputTokens"] = read
            u["cacheWriteInputTokens"] = write
        return u

    # -- answers ------------------------------------------------------------------------------
    @staticmethod
    def _reply(body: dict, s: Scripted | None = None) -> tuple[list[dict], str]:
        tid = "tooluse_" + hashlib.md5(json.dumps(body["messages"]).encode()).hexdigest()[:22]
        if s is not None and s.tool:
            return [{"toolUse": {"toolUseId": tid, "name": s.tool[0], "input": s.tool[1]}}], "tool_use"
        if s is not None and s.text is not None:
            return [{"text": s.text}], "end_turn"
        last = body["messages"][-1]
        results = [b["toolResult"] for b in last["content"] if "toolResult" in b]
        tc = body.get("toolConfig")
        if tc and not results and last["role"] == "user":
            choice = tc.get("toolChoice") or {}
            name = choice["tool"]["name"] if "tool" in choice else tc["tools"][0]["toolSpec"]["name"]
            spec = next(t["toolSpec"] for t in tc["tools"] if t["toolSpec"]["name"] == name)
            args = tool_args(spec["inputSchema"]["json"])
            return [{"toolUse": {"toolUseId": tid, "name": name, "input": args}}], "tool_use"
        if results:
            text = "The tool said: " + " ".join(c.get("text", json.dumps(c.get("json"))) for c in results[0]["content"])
        else:
            bits = []
            for b in last["content"]:
                if "text" in b:
                    bits.append(b["text"])
                elif "image" in b:
                    bits.append(f"[image {b['image']['format']} {len(base64.b64decode(b['image']['source']['bytes']))} "
                                "bytes]")
            text = "echo: " + " ".join(bits)
        cfg = body.get("inferenceConfig") or {}
        for s in cfg.get("stopSequences") or []:
            if s in text:
                return [{"text": text[: text.index(s)]}], "stop_sequence"
        words = text.split(" ")
        if cfg.get("maxTokens") and len(words) > cfg["maxTokens"]:
            return [{"text": " ".join(words[: cfg["maxTokens"]])}], "max_tokens"
        return [{"text": text}], "end_turn"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        rec = {"path": request.path, "raw_path": request.raw_path, "headers": dict(request.headers), "raw": raw,
               "time": time.time()}
        self.requests.append(rec)
        model = unquote(request.match_info["model_id"])
        action = request.match_info["action"]
        try:
            self._verify(request, raw)
            if action not in ("converse", "converse-stream"):
                raise AwsError(404, "UnknownOperationException", "Unknown operation")
            body = json.loads(raw)
            rec["json"] = body
            if model not in MODELS:
                raise AwsError(400, "ValidationException", "The provided model identifier is invalid.")
        except AwsError as e:
            return aws_error(e.status, e.kind, str(e))
        except ValueError:
            return aws_error(400, "SerializationException", "Could not parse the request body")
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
            self._validate(model, action, body)
        except AwsError as e:
            return aws_error(e.status, e.kind, str(e))
        content, stop = self._reply(body, s)
        out_tokens = max(1, sum(len(b.get("text", json.dumps(b.get("toolUse"))).split()) for b in content))
        usage = self._usage(model, body, out_tokens)
        if action == "converse":
            return web.json_response({"output": {"message": {"role": "assistant", "content": content}},
                                      "stopReason": stop, "usage": usage, "metrics": {"latencyMs": 42}},
                                     headers={"x-amzn-RequestId": "00000000-mock"})
        frames = [eventstream.event("messageStart", json.dumps({"role": "assistant", "p": "abcd"}).encode())]
        for i, b in enumerate(content):
            if "text" in b:
                words = b["text"].split(" ")
                for k, w in enumerate(words):
                    frames.append(eventstream.event("contentBlockDelta", json.dumps(
                        {"contentBlockIndex": i, "delta": {"text": w if k == 0 else " " + w}, "p": "ab"}).encode()))
            else:
                tu = b["toolUse"]
                frames.append(eventstream.event("contentBlockStart", json.dumps(
                    {"contentBlockIndex": i, "start": {"toolUse": {"toolUseId": tu["toolUseId"], "name": tu["name"]}},
                     "p": "abc"}).encode()))
                args = json.dumps(tu["input"]) if tu["input"] else ""
                for k in range(0, len(args), 5):
                    frames.append(eventstream.event("contentBlockDelta", json.dumps(
                        {"contentBlockIndex": i, "delta": {"toolUse": {"input": args[k:k + 5]}}}).encode()))
            frames.append(eventstream.event("contentBlockStop", json.dumps({"contentBlockIndex": i}).encode()))
        frames.append(eventstream.event("messageStop", json.dumps({"stopReason": stop}).encode()))
        frames.append(eventstream.event("metadata", json.dumps({"usage": usage, "metrics": {"latencyMs": 42}}).encode()))
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream",
                                           "x-amzn-RequestId": "00000000-mock"})
        await resp.prepare(request)
        self.active_streams += 1
        try:
            for i, f in enumerate(frames):
                if s is not None and s.cut_after is not None and i >= s.cut_after:
                    request.transport.close()
                    return resp
                if s is not None and s.error_after is not None and i >= s.error_after:
                    await resp.write(eventstream.exception("modelStreamErrorException", json.dumps(
                        {"message": "The model stream failed", "originalStatusCode": 500}).encode()))
                    return resp
                await resp.write(f)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled_streams += 1
            raise
        finally:
            self.active_streams -= 1
        return resp
