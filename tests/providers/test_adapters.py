"""The adapters' pure translations, checked against the providers' documented shapes (no network)."""
from __future__ import annotations

import json
import random

import orjson
import pytest

from common.asgi import HTTPError
from router.catalog import load_catalog
from router.providers import anthropic, bedrock, gemini, openai_compat
from router.providers import adapter
from router.providers.base import Adapter, StreamTranslator, normalize_usage
from router.accounting.cost import cost_of
from tests.helpers.servers import ROOT
from tests.mocks import eventstream

CATALOG = load_catalog(ROOT / "models.yaml")


def route(name):
    return CATALOG.resolve(name)


def chunks_of(out: list[bytes]) -> list[dict]:
    return [json.loads(e[6:]) for e in b"".join(out).split(b"\n\n") if e.startswith(b"data: ")]


def feed_in_pieces(tr, data: bytes) -> list[bytes]:
    """Feed a stream in random small pieces, as TCP may cut it."""
    rnd = random.Random(7)
    out, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 40)
        out += tr.feed(data[i:i + n])
        i += n
    return out + tr.close()


@pytest.mark.parametrize("protocol,model", [("openai", "openai/gpt-4o"), ("anthropic", "anthropic/claude-sonnet"),
                                            ("gemini", "google/gemini-flash"), ("bedrock", "aws/llama-3.1-70b")])
def test_every_adapter_implements_the_protocol(protocol, model):
    """The pipeline calls adapters only through base.Adapter; a provider module missing a piece fails
    here, not on the first request of that kind."""
    mod = adapter(protocol)
    assert isinstance(mod, Adapter)
    tr = mod.stream(route(model), "chat")
    assert isinstance(tr, StreamTranslator) and hasattr(tr, "usage") and hasattr(tr, "template")


# -- OpenAI --------------------------------------------------------------------------------
def test_openai_reasoning_models_and_cache_control():
    body = {"model": "openai/o3-mini", "max_tokens": 100, "temperature": 0.2, "top_p": 0.5, "reasoning_effort": "high",
            "messages": [{"role": "system", "content": "s", "cache_control": {"type": "ephemeral"}},
                         {"role": "user", "content": [{"type": "text", "text": "u",
                                                       "cache_control": {"type": "ephemeral"}}]}]}
    out = openai_compat.build_body(route("openai/o3-mini"), "chat", body, stream=True)
    assert out["model"] == "o3-mini" and out["max_completion_tokens"] == 100 and "max_tokens" not in out
    assert "temperature" not in out and "top_p" not in out and out["reasoning_effort"] == "high"
    assert "cache_control" not in out["messages"][0] and "cache_control" not in out["messages"][1]["content"][0]
    assert out["stream_options"] == {"include_usage": True}
    o1mini = openai_compat.build_body(route("openai/o1-mini"), "chat", {
        "reasoning_effort": "low", "messages": [{"role": "system", "content": "s"}]}, False)
    assert o1mini["messages"][0]["role"] == "user"
    assert "reasoning_effort" not in o1mini              # o1-mini refuses it (catalog: supports_reasoning_effort)
    plain = openai_compat.build_body(route("openai/gpt-4o"), "chat", {
        "max_tokens": 5, "temperature": 0.3, "reasoning_effort": "low", "messages": [],
        "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": {"type": "ephemeral"}}]}, False)
    assert plain["max_tokens"] == 5 and plain["temperature"] == 0.3
    assert "reasoning_effort" not in plain and plain["tools"] == [{"type": "function", "function": {"name": "f"}}]
    grok = openai_compat.build_body(route("xai/grok-mini"), "chat", {
        "max_tokens": 5, "temperature": 0.3, "reasoning_effort": "high", "messages": []}, False)
    assert grok["max_tokens"] == 5 and grok["temperature"] == 0.3       # OpenAI's rules stay with OpenAI
    assert grok["reasoning_effort"] == "high"


# -- Anthropic -----------------------------------------------------------------------------
def test_anthropic_request_shape():
    body = {"messages": [
        {"role": "system", "content": "You are terse.", "cache_control": {"type": "ephemeral"}},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "Look:", "cache_control": {"type": "ephemeral"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AA=="}},
                                     {"type": "image_url", "image_url": "https://example.org/a.png"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "Thanks"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
                  {"type": "function", "function": {"name": "get_time"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
        "stop": "END", "temperature": 0.5, "top_p": 0.9, "seed": 4, "logprobs": True, "user": "u@lbl.gov",
        "max_completion_tokens": 300}
    out = anthropic.to_messages_body(route("anthropic/claude-sonnet"), body, stream=True)
    assert out["model"] == "claude-sonnet-4-5" and out["max_tokens"] == 300 and out["stream"] is True
    assert out["system"] == [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                             {"type": "text", "text": "Use metric units."}]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    u0 = out["messages"][0]["content"]
    assert u0[0] == {"type": "text", "text": "Hi"}
    assert u0[1] == {"type": "text", "text": "Look:", "cache_control": {"type": "ephemeral"}}
    assert u0[2] == {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/AA=="}}
    assert u0[3] == {"type": "image", "source": {"type": "url", "url": "https://example.org/a.png"}}
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
        {"type": "text", "text": "Thanks"}]
    assert out["tools"][0] == {"name": "get_weather", "description": "Weather",
                               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    assert out["tools"][1]["input_schema"] == {"type": "object", "properties": {}}
    assert out["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert out["stop_sequences"] == ["END"] and out["temperature"] == 0.5 and "top_p" not in out
    assert out["metadata"] == {"user_id": "u@lbl.gov"}
    for k in ("seed", "logprobs", "parallel_tool_calls", "user", "max_completion_tokens"):
        assert k not in out


@pytest.mark.parametrize("choice,expected", [("auto", {"type": "auto"}), ("required", {"type": "any"}),
                                             ("none", {"type": "none"})])
def test_anthropic_tool_choice(choice, expected):
    out = anthropic.to_messages_body(route("anthropic/claude-haiku"), {
        "messages": [{"role": "user", "content": "x"}], "tool_choice": choice,
        "tools": [{"type": "function", "function": {"name": "f"}}]}, False)
    assert out["tool_choice"] == expected


def test_anthropic_defaults_and_simple_shapes():
    out = anthropic.to_messages_body(route("anthropic/claude-opus"), {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "top_p": 0.3}, False)
    assert out == {"model": "claude-opus-4-1", "system": "S", "messages": [{"role": "user", "content": "Q"}],
                   "max_tokens": 4096, "top_p": 0.3}
    think = anthropic.to_messages_body(route("anthropic/claude-sonnet"), {
        "messages": [{"role": "user", "content": "Q"}], "reasoning_effort": "low", "temperature": 0.2,
        "max_tokens": 500}, False)
    assert think["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert "temperature" not in think and think["max_tokens"] == 1524
    with pytest.raises(HTTPError) as e:
        anthropic.to_messages_body(route("anthropic/claude-sonnet"), {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]}, False)
    assert e.value.status == 400 and "image/tiff" in e.value.message


# Recorded from the shapes of Anthropic's Messages documentation.
ANTHROPIC_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "I'll check the weather."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                 "input": {"location": "San Francisco, CA", "unit": "celsius"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 50, "cache_creation_input_tokens": 2051, "cache_read_input_tokens": 1000,
              "output_tokens": 89, "service_tier": "standard"}}


def test_anthropic_response_and_usage():
    r = anthropic.parse(route("anthropic/claude-sonnet"), "chat", orjson.dumps(ANTHROPIC_MESSAGE))
    assert r["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL" and r["object"] == "chat.completion"
    msg = r["choices"][0]["message"]
    assert msg["content"] == "I'll check the weather."
    assert msg["tool_calls"] == [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location":"San Francisco, CA","unit":"celsius"}'}}]
    assert r["choices"][0]["finish_reason"] == "tool_calls"
    u = r["usage"]
    assert u["prompt_tokens"] == 50 + 2051 + 1000 and u["prompt_tokens_details"]["cached_tokens"] == 1000
    assert u["cache_creation_input_tokens"] == 2051 and u["completion_tokens"] == 89
    price = route("anthropic/claude-sonnet").model.price
    assert cost_of(price, u) == pytest.approx((50 * 3 + 2051 * 3.75 + 1000 * 0.3 + 89 * 15) / 1e6)


def _sse(events) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)


ANTHROPIC_STREAM = [
    {"type": "message_start", "message": {"id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant",
                                          "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": None,
                                          "stop_sequence": None, "usage": {"input_tokens": 472, "output_tokens": 2,
                                                                           "cache_read_input_tokens": 100,
                                                                           "cache_creation_input_tokens": 0}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", let's check."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                                                                  "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"location\":"}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " \"San Francisc"}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "o, CA\"}"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 89}},
    {"type": "message_stop"},
]


def test_anthropic_stream():
    tr = anthropic.stream(route("anthropic/claude-sonnet"), "chat")
    chunks = chunks_of(feed_in_pieces(tr, _sse(ANTHROPIC_STREAM)))
    assert {c["id"] for c in chunks} == {"msg_014p7gG3wDgGV9EUtLvnow3U"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Okay, let's check."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"location": "San Francisco, CA"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["tool_calls"]
    assert tr.usage["prompt_tokens"] == 572 and tr.usage["completion_tokens"] == 89
    assert tr.usage["prompt_tokens_details"]["cached_tokens"] == 100
    assert tr.template["id"] == "msg_014p7gG3wDgGV9EUtLvnow3U" and tr.error is None


def test_anthropic_stream_error_event():
    tr = anthropic.stream(route("anthropic/claude-sonnet"), "chat")
    out = tr.feed(_sse(ANTHROPIC_STREAM[:4] + [{"type": "error", "error": {"type": "overloaded_error",
                                                                           "message": "Overloaded"}}]))
    last = chunks_of(out)[-1]
    assert set(last) == {"error"} and "Overloaded" in last["error"]["message"]
    assert tr.error and tr.usage["prompt_tokens"] == 572      # usage so far stays known


def _tool_args(chunks: list[dict]) -> dict[int, str]:
    """The streamed arguments of each tool call, assembled as a client does."""
    args: dict[int, str] = {}
    for c in chunks:
        for tc in c["choices"][0]["delta"].get("tool_calls", []) if c.get("choices") else ():
            args[tc["index"]] = args.get(tc["index"], "") + tc["function"].get("arguments", "")
    return args


def test_anthropic_stream_tool_call_without_arguments():
    """Opened with "" and only empty partial_json after: one "{}" piece when the block stops."""
    no_args = [{"type": "content_block_start", "index": 1, "content_block": {
                   "type": "tool_use", "id": "toolu_01", "name": "get_time", "input": {}}},
               {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
               {"type": "content_block_stop", "index": 1}]
    weather = [{**e, "index": 2} for e in ANTHROPIC_STREAM[6:12]]      # the weather call comes second
    events = ANTHROPIC_STREAM[:6] + no_args + weather + ANTHROPIC_STREAM[12:]
    tr = anthropic.stream(route("anthropic/claude-sonnet"), "chat")
    args = _tool_args(chunks_of(feed_in_pieces(tr, _sse(events))))
    assert args[0] == "{}" and json.loads(args[1]) == {"location": "San Francisco, CA"}


def test_stream_error_messages_are_scrubbed():
    key = "sk-ant-api03-LEAKEDKEY0123456789"
    tr = anthropic.stream(route("anthropic/claude-sonnet"), "chat")
    out = tr.feed(_sse(ANTHROPIC_STREAM[:1] + [{"type": "error", "error": {"type": "api_error",
                                                                           "message": f"bad key {key}"}}]))
    assert key not in b"".join(out).decode() and key not in tr.error and "***" in tr.error
    tr = gemini.stream(route("google/gemini-flash"), "chat")
    out = tr.feed(b'data: {"error": {"code": 400, "message": "key AIzaLEAKEDgeminiKEY0123456789abc", '
                  b'"status": "INVALID_ARGUMENT"}}\r\n\r\n')
    assert b"AIzaLEAKED" not in b"".join(out) and "AIzaLEAKED" not in tr.error
    tr = bedrock.stream(route("aws/command-r-v1"), "chat")
    out = tr.feed(eventstream.exception("validationException", b'{"message":"key AKIALEAKEDKEY0000001"}'))
    assert b"AKIALEAKED" not in b"".join(out) and "AKIALEAKED" not in tr.error


@pytest.mark.parametrize("name,content", [
    ("anthropic/claude-sonnet", ""), ("anthropic/claude-sonnet", [{"type": "text", "text": ""}]),
    ("anthropic/claude-sonnet", " \n"), ("google/gemini-flash", ""), ("google/gemini-flash", []),
    ("aws/command-r-v1", ""), ("aws/command-r-v1", [{"type": "text", "text": " "}]),
])
def test_empty_user_message_gets_placeholder_text(name, content):
    """OpenAI takes an empty user message; these APIs refuse empty messages and empty text blocks."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": content}]
    r = route(name)
    if name.startswith("anthropic"):
        last = anthropic.to_messages_body(r, {"messages": msgs}, False)["messages"][-1]["content"]
        assert last == "(empty)"
    elif name.startswith("google"):
        assert gemini.to_gemini_body(r, {"messages": msgs})["contents"][-1]["parts"] == [{"text": "(empty)"}]
    else:
        assert bedrock.to_converse_body(r, {"messages": msgs})["messages"][-1]["content"] == [{"text": "(empty)"}]


def test_blank_text_parts_are_left_out():
    parts = [{"type": "text", "text": ""}, {"type": "text", "text": "Look"}, {"type": "text", "text": "  "}]
    msgs = [{"role": "user", "content": parts}]
    assert anthropic.to_messages_body(route("anthropic/claude-haiku"), {"messages": msgs}, False)["messages"] == \
        [{"role": "user", "content": "Look"}]
    assert gemini.to_gemini_body(route("google/gemini-flash"), {"messages": msgs})["contents"][0]["parts"] == \
        [{"text": "Look"}, {"text": "  "}]      # Gemini takes whitespace; only empty parts are refused
    assert bedrock.to_converse_body(route("aws/command-r-v1"), {"messages": msgs})["messages"][0]["content"] == \
        [{"text": "Look"}]


_BODIES = {"anthropic/claude-sonnet": lambda r, b: anthropic.to_messages_body(r, b, False),
           "google/gemini-flash": gemini.to_gemini_body, "aws/llama-3.1-70b": bedrock.to_converse_body}


@pytest.mark.parametrize("name", list(_BODIES))
@pytest.mark.parametrize("part", [
    {"type": "file", "file": "x"}, {"type": "file", "file": {"file_data": 5}}, {"type": "file", "file": None},
    {"type": "file", "file": {"file_data": "data:application/pdf,plain"}}, {"type": "file"},
    {"type": "image_url", "image_url": {"url": "data:image/png,AAAA"}}, {"type": "image_url", "image_url": 7},
    {"type": "image_url", "image_url": {"url": ["data:"]}}, {"type": "image_url", "image_url": {"url": "ftp://x"}},
])
def test_malformed_media_parts_are_a_400_naming_the_part(name, part):
    """Files and images that are not base64 data URLs (or are not even strings) are the caller's
    mistake on every adapter: a 400 naming the content part, never an AttributeError (a 500)."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]
    with pytest.raises(HTTPError) as e:
        _BODIES[name](route(name), {"messages": msgs})
    assert e.value.status == 400 and "messages[0].content[1]" in e.value.message


@pytest.mark.parametrize("name", list(_BODIES))
@pytest.mark.parametrize("call", [
    {"id": "c1", "type": "function", "function": {"name": 5, "arguments": "{}"}},
    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}},
    {"id": "c1", "type": "function", "function": "f"}, "c1",
])
def test_malformed_tool_calls_in_history_are_a_400(name, call):
    """An assistant turn's tool call whose name is not a string or whose arguments are not a JSON
    object cannot be expressed to these providers: a 400 naming the call on each of them."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    with pytest.raises(HTTPError) as e:
        _BODIES[name](route(name), {"messages": msgs})
    assert e.value.status == 400 and "messages[1].tool_calls[0]" in e.value.message


# -- Gemini --------------------------------------------------------------------------------
def test_gemini_request_shape():
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "png"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "other", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"answer": 42}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "plain text"}],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Look up",
                                                    "parameters": {"type": "object", "additionalProperties": False,
                                                                   "properties": {"q": {"type": "string"}}}}}],
        "tool_choice": "required", "temperature": 0.1, "top_p": 0.8, "max_tokens": 64, "stop": ["\n\n"], "n": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "reasoning_effort": "low"}
    out = gemini.to_gemini_body(route("google/gemini-pro"), body)
    assert out["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "What is this?"}, {"inlineData": {"mimeType": "image/png",
                                                                             "data": "iVBORw0KGgo="}}]},
        {"role": "model", "parts": [{"functionCall": {"name": "lookup", "args": {"q": "png"}}},
                                    {"functionCall": {"name": "other", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "lookup", "response": {"answer": 42}}},
                                   {"functionResponse": {"name": "other", "response": {"content": "plain text"}}}]}]
    decl = out["tools"][0]["functionDeclarations"][0]
    assert decl["name"] == "lookup" and decl["parametersJsonSchema"]["additionalProperties"] is False
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert out["generationConfig"] == {"temperature": 0.1, "topP": 0.8, "candidateCount": 2, "maxOutputTokens": 64,
                                       "stopSequences": ["\n\n"], "responseMimeType": "application/json",
                                       "responseJsonSchema": {"type": "object"},
                                       "thinkingConfig": {"thinkingBudget": 1024}}
    named = gemini.to_gemini_body(route("google/gemini-flash"), {"messages": [{"role": "user", "content": "x"}],
        "tools": body["tools"], "tool_choice": {"type": "function", "function": {"name": "lookup"}}})
    assert named["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}}


def test_gemini_build_paths_and_key_header():
    from router.providers import make_endpoint
    ep = make_endpoint("google", CATALOG.providers["google"], env={"GEMINI_API_KEY": "AIzaTEST"})
    r = route("google/gemini-flash")
    req = gemini.build(ep, r, "chat", {"messages": [{"role": "user", "content": "x"}]}, stream=True)
    assert req.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert (b"x-goog-api-key", b"AIzaTEST") in req.headers
    req = gemini.build(ep, r, "chat", {"messages": [{"role": "user", "content": "x"}]}, stream=False)
    assert req.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    v1 = make_endpoint("google", CATALOG.providers["google"].model_copy(update={"api_version": "v1"}),
                       env={"GEMINI_API_KEY": "AIzaTEST"})
    assert gemini.build(v1, r, "chat", {"messages": [{"role": "user", "content": "x"}]}, False).path == \
        "/v1/models/gemini-2.5-flash:generateContent"


GEMINI_RESPONSE = {
    "candidates": [{"content": {"parts": [{"text": "Hello", "thought": True}, {"text": "Hi there!"}], "role": "model"},
                    "finishReason": "STOP", "index": 0,
                    "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]}],
    "usageMetadata": {"promptTokenCount": 2100, "candidatesTokenCount": 12, "totalTokenCount": 2142,
                      "cachedContentTokenCount": 2048, "thoughtsTokenCount": 30,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2100}]},
    "modelVersion": "gemini-2.5-flash", "responseId": "mAitaLmkHPPlz7IPvtfUqQ4"}


def test_gemini_response_and_usage():
    r = gemini.parse(route("google/gemini-flash"), "chat", orjson.dumps(GEMINI_RESPONSE))
    assert r["choices"][0]["message"]["content"] == "Hi there!"
    assert r["choices"][0]["message"]["reasoning_content"] == "Hello"
    assert r["choices"][0]["finish_reason"] == "stop" and r["model"] == "gemini-2.5-flash"
    assert r["usage"] == {"prompt_tokens": 2100, "completion_tokens": 42, "total_tokens": 2142,
                          "prompt_tokens_details": {"cached_tokens": 2048},
                          "completion_tokens_details": {"reasoning_tokens": 30}}
    call = gemini.parse(route("google/gemini-flash"), "chat", orjson.dumps({"candidates": [{"content": {"parts": [
        {"functionCall": {"name": "find_theaters", "args": {"location": "Mountain View, CA", "movie": "Barbie"}}}],
        "role": "model"}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 9}}))
    tc = call["choices"][0]["message"]["tool_calls"][0]
    assert tc["id"].startswith("call_") and tc["function"]["name"] == "find_theaters"
    assert json.loads(tc["function"]["arguments"]) == {"location": "Mountain View, CA", "movie": "Barbie"}
    assert call["choices"][0]["finish_reason"] == "tool_calls"
    assert call["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize("obj", [
    {"candidates": [{"content": {"role": "model"}, "finishReason": "SAFETY", "index": 0}],
     "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}},
    {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}},
])
def test_gemini_blocked_is_content_filter(obj):
    r = gemini.parse(route("google/gemini-flash"), "chat", orjson.dumps(obj))
    assert r["choices"][0]["finish_reason"] == "content_filter" and r["choices"][0]["message"]["content"] is None
    tr = gemini.stream(route("google/gemini-flash"), "chat")
    out = chunks_of(tr.feed(b"data: " + orjson.dumps(obj) + b"\r\n\r\n"))
    assert out[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_gemini_stream():
    events = [
        {"candidates": [{"content": {"parts": [{"text": "The"}], "role": "model"}, "index": 0}],
         "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}, "modelVersion": "gemini-2.5-pro",
         "responseId": "r1"},
        {"candidates": [{"content": {"parts": [{"text": " answer"}], "role": "model"}, "index": 0}],
         "modelVersion": "gemini-2.5-pro", "responseId": "r1"},
        {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {"a": [1, 2]}}}], "role": "model"},
                         "finishReason": "STOP", "index": 0}],
         "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 5, "thoughtsTokenCount": 3,
                           "totalTokenCount": 16, "cachedContentTokenCount": 4}, "modelVersion": "gemini-2.5-pro",
         "responseId": "r1"}]
    data = b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
    tr = gemini.stream(route("google/gemini-pro"), "chat")
    chunks = chunks_of(feed_in_pieces(tr, data))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "The answer"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0 and json.loads(calls[0]["function"]["arguments"]) == {"a": [1, 2]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert tr.usage["completion_tokens"] == 8 and tr.usage["prompt_tokens_details"]["cached_tokens"] == 4
    assert {c["id"] for c in chunks} == {"r1"}


# -- Bedrock -------------------------------------------------------------------------------
def test_bedrock_request_shape_and_cache_points():
    msgs = [{"role": "system", "content": "Sys", "cache_control": {"type": "ephemeral"}},
            {"role": "user", "content": [{"type": "text", "text": "Doc", "cache_control": {"type": "ephemeral"}},
                                         {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "tooluse_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "tool_call_id": "tooluse_1", "content": "ok"}]
    body = {"messages": msgs, "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "stop": "##", "top_k": 5,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "auto"}
    llama = bedrock.to_converse_body(route("aws/llama-3.1-70b"), body)
    assert llama["system"] == [{"text": "Sys"}]              # no prompt caching on Llama: no cachePoint
    assert llama["messages"] == [
        {"role": "user", "content": [{"text": "Doc"}, {"text": "Q"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "tooluse_1", "name": "f", "input": {"x": 1}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "ok"}]}}]}]
    assert llama["inferenceConfig"] == {"maxTokens": 50, "temperature": 0.2, "topP": 0.9, "stopSequences": ["##"]}
    assert llama["toolConfig"] == {"tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}}}]}
    assert llama["additionalModelRequestFields"] == {"top_k": 5}
    c = bedrock.to_converse_body(aws_model("us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                                           supports_prompt_caching=True),
                                 {**body, "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert c["toolConfig"]["toolChoice"] == {"tool": {"name": "f"}}
    assert c["system"] == [{"text": "Sys"}, {"cachePoint": {"type": "default"}}]
    assert c["messages"][0]["content"] == [{"text": "Doc"}, {"cachePoint": {"type": "default"}}, {"text": "Q"}]


def aws_model(model_id: str, **caps):
    """A route to an aws/ model the catalog does not list (model id and capabilities changed)."""
    r = CATALOG.resolve("aws/llama-3.1-70b")
    return type(r)(r.name, r.model.model_copy(update={"model": model_id, **caps}), r.provider, r.provider_name)


USE_AND_RESULT = [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "tooluse_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "tooluse_1", "content": "sunny"}]
F = [{"type": "function", "function": {"name": "f"}}]


def test_bedrock_tool_config_follows_the_conversation():
    llama = route("aws/llama-3.1-8b")
    # a follow-up without tools: Bedrock needs a toolConfig for toolUse/toolResult blocks
    follow = bedrock.to_converse_body(llama, {"messages": USE_AND_RESULT})
    assert [t["toolSpec"]["name"] for t in follow["toolConfig"]["tools"]] == ["dummy_tool"]
    assert "toolChoice" not in follow["toolConfig"]
    # tool_choice "none": no tools for a conversation without tool blocks; with them they stay declared
    plain = [{"role": "user", "content": "hi"}]
    assert "toolConfig" not in bedrock.to_converse_body(llama, {"messages": plain, "tools": F, "tool_choice": "none"})
    kept = bedrock.to_converse_body(llama, {"messages": USE_AND_RESULT, "tools": F, "tool_choice": "none"})
    assert kept["toolConfig"] == {"tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {
        "type": "object", "properties": {}}}}}]}
    assert "toolConfig" not in bedrock.to_converse_body(llama, {"messages": plain})
    # auto is Converse's default: no toolChoice (Cohere's Converse support takes none at all)
    auto = bedrock.to_converse_body(route("aws/command-r-v1"), {"messages": plain, "tools": F, "tool_choice": "auto"})
    assert "toolChoice" not in auto["toolConfig"]


@pytest.mark.parametrize("model_id,choice,expected", [
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "required", {"any": {}}),
    ("mistral.mistral-large-2407-v1:0", "required", {"any": {}}),
    ("us.amazon.nova-pro-v1:0", {"type": "function", "function": {"name": "f"}}, {"tool": {"name": "f"}}),
    ("meta.llama3-1-8b-instruct-v1:0", "required", None),
    ("cohere.command-r-v1:0", {"type": "function", "function": {"name": "f"}}, None),
    ("mistral.mistral-large-2407-v1:0", {"type": "function", "function": {"name": "f"}}, None),
])
def test_bedrock_tool_choice_where_converse_has_it(model_id, choice, expected):
    body = {"messages": [{"role": "user", "content": "x"}], "tools": F, "tool_choice": choice}
    if expected is None:
        with pytest.raises(HTTPError) as e:
            bedrock.to_converse_body(aws_model(model_id), body)
        assert e.value.status == 400 and e.value.param == "tool_choice" and "use 'auto'" in e.value.message
    else:
        assert bedrock.to_converse_body(aws_model(model_id), body)["toolConfig"]["toolChoice"] == expected


def test_bedrock_streams_tools_by_family():
    assert not bedrock.streams_tools("us.meta.llama3-1-8b-instruct-v1:0")
    assert not bedrock.streams_tools("mistral.mistral-large-2407-v1:0")
    assert bedrock.streams_tools("cohere.command-r-v1:0") and bedrock.streams_tools("eu.anthropic.claude-x")


@pytest.mark.parametrize("env,config,expected", [
    ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-central-1"}, None, "eu-west-1"),
    ({"AWS_DEFAULT_REGION": "eu-central-1"}, "[default]\nregion = ap-south-1\n", "eu-central-1"),
    ({}, "[default]\nregion = ap-south-1\n", "ap-south-1"),
    ({"AWS_PROFILE": "lab"}, "[default]\nregion = ap-south-1\n[profile lab]\nregion = ca-central-1\n", "ca-central-1"),
    ({"AWS_PROFILE": "absent"}, "[default]\nregion = ap-south-1\n", "us-west-2"),
    ({}, None, "us-west-2"),                                  # models.yaml's region, the last default
])
def test_bedrock_region_as_the_aws_sdks_find_it(tmp_path, env, config, expected):
    from router.providers import make_endpoint
    path = tmp_path / "config"
    if config:
        path.write_text(config)
    env = {**env, "AWS_CONFIG_FILE": str(path)}
    ep = make_endpoint("aws", CATALOG.providers["aws"], env=env)
    assert ep.region == expected and ep.target.host == f"bedrock-runtime.{expected}.amazonaws.com"


def test_bedrock_region_from_the_process_environment(tmp_path, monkeypatch):
    from router.providers import make_endpoint
    (tmp_path / "config").write_text("[profile lab]\nregion = sa-east-1\n")
    for k in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    assert make_endpoint("aws", CATALOG.providers["aws"]).region == "sa-east-1"


def test_bedrock_signed_request(monkeypatch):
    import asyncio
    from router.providers import make_endpoint
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
           "AWS_SESSION_TOKEN": "tok", "AWS_REGION": "eu-west-1"}
    ep = make_endpoint("aws", CATALOG.providers["aws"], env=env)
    assert ep.target.host == "bedrock-runtime.eu-west-1.amazonaws.com" and ep.region == "eu-west-1"
    asyncio.run(bedrock.prepare(ep))
    req = bedrock.build(ep, route("aws/llama-3.1-405b"), "chat", {"messages": [{"role": "user", "content": "x"}]}, True)
    assert req.path == "/model/meta.llama3-1-405b-instruct-v1%3A0/converse-stream"
    h = dict(req.headers)
    assert h[b"authorization"].startswith(b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert b"/eu-west-1/bedrock/aws4_request" in h[b"authorization"]
    assert h[b"x-amz-security-token"] == b"tok" and b"x-amz-date" in h
    tools = {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert bedrock.build(ep, route("aws/llama-3.1-405b"), "chat", tools, True).path.endswith("/converse")
    assert bedrock.build(ep, route("aws/command-r-v1"), "chat", tools, True).path.endswith("/converse-stream")


CONVERSE_RESPONSE = {"output": {"message": {"role": "assistant", "content": [
    {"text": "Let me look."}, {"toolUse": {"toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "name": "top_song",
                                           "input": {"sign": "WZPZ"}}}]}},
    "stopReason": "tool_use", "usage": {"inputTokens": 100, "outputTokens": 20, "totalTokens": 1620,
                                        "cacheReadInputTokens": 1000, "cacheWriteInputTokens": 500},
    "metrics": {"latencyMs": 890}}


def test_bedrock_response_and_usage():
    r = bedrock.parse(route("aws/command-r-plus-v1"), "chat", orjson.dumps(CONVERSE_RESPONSE))
    m = r["choices"][0]["message"]
    assert m["content"] == "Let me look." and r["choices"][0]["finish_reason"] == "tool_calls"
    assert m["tool_calls"][0]["id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
    assert json.loads(m["tool_calls"][0]["function"]["arguments"]) == {"sign": "WZPZ"}
    assert r["usage"]["prompt_tokens"] == 1600 and r["usage"]["prompt_tokens_details"]["cached_tokens"] == 1000
    assert r["usage"]["cache_creation_input_tokens"] == 500 and r["usage"]["total_tokens"] == 1620
    assert r["model"] == "cohere.command-r-plus-v1:0"


def test_bedrock_event_stream():
    frames = [eventstream.event("messageStart", b'{"role":"assistant","p":"abc"}'),
              eventstream.event("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hel"}}'),
              eventstream.event("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"lo"}}'),
              eventstream.event("contentBlockStop", b'{"contentBlockIndex":0}'),
              eventstream.event("contentBlockStart", b'{"contentBlockIndex":1,"start":{"toolUse":{"toolUseId":"t1","name":"f"}}}'),
              eventstream.event("contentBlockDelta", b'{"contentBlockIndex":1,"delta":{"toolUse":{"input":"{\\"a\\":"}}}'),
              eventstream.event("contentBlockDelta", b'{"contentBlockIndex":1,"delta":{"toolUse":{"input":" 1}"}}}'),
              eventstream.event("messageStop", b'{"stopReason":"tool_use"}'),
              eventstream.event("metadata", b'{"usage":{"inputTokens":10,"outputTokens":4,"totalTokens":14},"metrics":{"latencyMs":5}}')]
    tr = bedrock.stream(route("aws/command-r-v1"), "chat")
    chunks = chunks_of(feed_in_pieces(tr, b"".join(frames)))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Hello"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["id"] == "t1" and json.loads("".join(c["function"]["arguments"] for c in calls)) == {"a": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert tr.usage["prompt_tokens"] == 10 and tr.usage["completion_tokens"] == 4
    # an exception message inside the stream
    tr = bedrock.stream(route("aws/command-r-v1"), "chat")
    out = chunks_of(tr.feed(frames[0] + eventstream.exception("throttlingException", b'{"message":"Slow down"}')))
    assert out[-1]["error"]["code"] == "throttlingException" and "Slow down" in out[-1]["error"]["message"]
    # a corrupted frame is reported in the stream (botocore checks the CRC), and nothing follows it
    bad = bytearray(frames[1])
    bad[-6] ^= 0xFF
    tr = bedrock.stream(route("aws/command-r-v1"), "chat")
    out = chunks_of(tr.feed(frames[0] + bytes(bad)))
    assert out[0]["choices"][0]["delta"]["role"] == "assistant"
    assert out[-1]["error"]["code"] == "bad_upstream_response" and "Checksum" in out[-1]["error"]["message"]
    assert tr.error and tr.feed(frames[2]) == []


@pytest.mark.parametrize("name,data", [
    ("anthropic/claude-sonnet", _sse(ANTHROPIC_STREAM[:4]) + b"event: content_block_delta\ndata: {not json\n\n"),
    ("google/gemini-flash", b'data: {"candidates": [{"content": {"parts": [{"text": "a"}]}, "index": 0}]}\r\n\r\n'
                            b"data: [1, 2\r\n\r\n"),
])
def test_unreadable_stream_event_is_reported_in_stream(name, data):
    ad = anthropic if name.startswith("anthropic") else gemini
    tr = ad.stream(route(name), "chat")
    out = chunks_of(feed_in_pieces(tr, data))
    assert any(c.get("choices") for c in out)
    assert out[-1]["error"]["code"] == "bad_upstream_response" and tr.error


@pytest.mark.parametrize("deltas", [[], [b'{"contentBlockIndex":0,"delta":{"toolUse":{"input":""}}}']])
def test_bedrock_stream_tool_call_without_arguments(deltas):
    frames = [eventstream.event("messageStart", b'{"role":"assistant"}'),
              eventstream.event("contentBlockStart",
                                b'{"contentBlockIndex":0,"start":{"toolUse":{"toolUseId":"t0","name":"now"}}}'),
              *(eventstream.event("contentBlockDelta", d) for d in deltas),
              eventstream.event("contentBlockStop", b'{"contentBlockIndex":0}'),
              eventstream.event("messageStop", b'{"stopReason":"tool_use"}')]
    tr = bedrock.stream(route("aws/command-r-v1"), "chat")
    assert _tool_args(chunks_of(feed_in_pieces(tr, b"".join(frames)))) == {0: "{}"}


def test_passthrough_stream_unreadable_event_is_reported():
    """A broken event that mentions usage or error: an error event, and nothing relayed after it."""
    tr = openai_compat.stream(route("openai/gpt-4o"), "chat")
    good = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    out = tr.feed(good + b'data: {"usage": {oops\n\n' + good)
    events = chunks_of(out)
    assert len(events) == 2 and events[0]["choices"][0]["delta"] == {"content": "a"}
    assert events[1]["error"]["code"] == "bad_upstream_response" and tr.error
    assert tr.feed(good) == [] and tr.close() == []


def test_bedrock_converse_answer_as_stream():
    tr = bedrock.stream(route("aws/llama-3.1-8b"), "chat")
    assert feed_in_pieces(tr, b"") == []
    tr = bedrock.stream(route("aws/llama-3.1-8b"), "chat")
    chunks = chunks_of(feed_in_pieces(tr, orjson.dumps(CONVERSE_RESPONSE)))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[1] == {"content": "Let me look."}
    assert deltas[2]["tool_calls"][0]["function"]["name"] == "top_song"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert tr.usage["prompt_tokens"] == 1600


@pytest.mark.parametrize("usage", [anthropic.usage_of(ANTHROPIC_MESSAGE["usage"]),
                                   gemini.usage_of(GEMINI_RESPONSE["usageMetadata"]),
                                   bedrock.usage_of(CONVERSE_RESPONSE["usage"]), anthropic.usage_of(None),
                                   gemini.usage_of({}), bedrock.usage_of(None)])
def test_usage_always_has_cached_tokens(usage):
    assert normalize_usage(usage)["prompt_tokens_details"]["cached_tokens"] >= 0
    assert "cached_tokens" in usage["prompt_tokens_details"]


def test_bedrock_error_message_drops_quoted_canonical_request():
    body = {"message": "The request signature we calculated does not match the signature you provided. Check your "
                       "AWS Secret Access Key and signing method. Consult the service documentation for details.\n\n"
                       "The Canonical String for this request should have been\n'POST\n/model/x/converse\n\n"
                       "host:bedrock-runtime.us-west-2.amazonaws.com\nx-amz-date:20261126T000000Z\n"
                       "x-amz-security-token:IQoJb3JpZ2luX2VjEXAMPLETOKEN\n'"}
    msg = bedrock.error_message(403, orjson.dumps(body))
    assert msg.startswith("The request signature we calculated does not match")
    assert "IQoJb3JpZ2lu" not in msg and "Canonical" not in msg
    assert bedrock.error_message(400, b'{"message":"Malformed input request"}') == "Malformed input request"
