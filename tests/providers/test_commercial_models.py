"""Every commercial model of models.yaml through the official openai SDK, against the provider mocks.

Each name is driven as researchers use it: a plain call, a stream with usage, a tool-call round
trip (streamed tool calls must assemble into valid JSON), an image where the model has vision;
`usage.prompt_tokens_details.cached_tokens` is always there. The CBorg prompt-caching example
runs as written for openai/gpt-4.1 and anthropic/claude-sonnet.
"""
from __future__ import annotations

import json

import openai
import pytest

from tests.providers.conftest import commercial_models

MODELS = commercial_models()
NAMES = [m["name"] for m in MODELS]
VISION = [m["name"] for m in MODELS if m.get("supports_vision")]
TOOLS = [m["name"] for m in MODELS if m.get("supports_function_calling")]
UNDERLYING = {m["name"]: m["model"] for m in MODELS}
PROVIDER = {m["name"]: m["provider"] for m in MODELS}
PRICE = {m["name"]: m["price"] for m in MODELS}

# A 1x1 PNG.
PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAA"
       "AABJRU5ErkJggg==")
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather at a place",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["location"], "additionalProperties": False}}}]


@pytest.fixture
def client(cgw, ckey, fresh):
    return openai.OpenAI(api_key=ckey, base_url=cgw.url, max_retries=0)


def sent(mocks, name: str) -> dict:
    return mocks.by_provider(PROVIDER[name]).requests[-1]


def test_catalog_has_every_provider():
    assert {PROVIDER[n] for n in NAMES} == {"openai", "xai", "anthropic", "google", "aws"}
    assert len(NAMES) >= 18


@pytest.mark.parametrize("name", NAMES)
def test_plain_call(client, fresh, ckey, name):
    raw = client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is the capital of France?"}])
    data = json.loads(raw.content)
    r = raw.parse()
    assert r.choices[0].message.content.endswith("What is the capital of France?")
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion"
    assert UNDERLYING[name] in r.model                      # the underlying model, as CBorg documents
    u = data["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] == 0
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    cost = float(raw.headers["x-litellm-response-cost"])
    p = PRICE[name]
    assert cost == pytest.approx((u["prompt_tokens"] * p["input"] + u["completion_tokens"] * p["output"]) / 1e6)
    assert cost > 0
    req = sent(fresh, name)
    assert UNDERLYING[name] in json.dumps(req.get("json")) + req["path"] + req.get("raw_path", "")
    h = {k.lower(): v for k, v in req["headers"].items()}
    mock = fresh.by_provider(PROVIDER[name])
    if PROVIDER[name] == "anthropic":
        assert h["x-api-key"] == mock.api_key and h["anthropic-version"] == "2023-06-01"
    elif PROVIDER[name] == "google":
        assert h["x-goog-api-key"] == mock.api_key
    elif PROVIDER[name] == "aws":
        assert h["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={mock.access_key}/")
    else:
        assert h["authorization"] == f"Bearer {mock.api_key}"
    assert not any(ckey in v for v in h.values())       # the researcher's key never reaches a provider


@pytest.mark.parametrize("name", NAMES)
def test_stream_with_usage(client, fresh, name):
    chunks = list(client.chat.completions.create(
        model=name, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "one two three four"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three four"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3   # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 0
    assert last.usage.completion_tokens > 0
    assert (last.usage.model_extra or {})["cost"] > 0
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("name", NAMES)
def test_stream_without_usage_has_none(client, fresh, name):
    chunks = list(client.chat.completions.create(model=name, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert chunks and all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def _round_trip(client, name: str, stream: bool, tools_on_follow_up: bool = True) -> None:
    msgs = [{"role": "user", "content": "What's the weather in Berkeley?"}]
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for c in client.chat.completions.create(model=name, messages=msgs, tools=WEATHER, stream=True):
            if not c.choices:
                continue
            for tc in c.choices[0].delta.tool_calls or ():
                d = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                d["id"] = tc.id or d["id"]
                d["name"] = (tc.function.name if tc.function else None) or d["name"]
                d["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert list(calls) == [0]
        call = calls[0]
    else:
        r = client.chat.completions.create(model=name, messages=msgs, tools=WEATHER)
        assert r.choices[0].finish_reason == "tool_calls"
        tc = r.choices[0].message.tool_calls[0]
        call = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
    assert call["name"] == "get_weather" and call["id"]
    assert json.loads(call["arguments"]) == {"location": "Berkeley, CA", "unit": "c"}   # valid JSON, in order
    msgs += [{"role": "assistant", "content": None, "tool_calls": [
                 {"id": call["id"], "type": "function", "function": {"name": call["name"],
                                                                     "arguments": call["arguments"]}}]},
             {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees and sunny"}]
    r2 = client.chat.completions.create(model=name, messages=msgs, **({"tools": WEATHER} if tools_on_follow_up else {}))
    assert r2.choices[0].message.content == "The tool said: 18 degrees and sunny"
    assert r2.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("name", TOOLS)
def test_tool_round_trip(client, fresh, name):
    _round_trip(client, name, stream=False)


@pytest.mark.parametrize("name", TOOLS)
def test_streamed_tool_round_trip(client, fresh, name):
    _round_trip(client, name, stream=True)


@pytest.mark.parametrize("name", TOOLS)
def test_tool_follow_up_without_tools(client, fresh, name):
    """The answer to a call sent without `tools`, as OpenAI takes it (Bedrock needs a toolConfig then)."""
    _round_trip(client, name, stream=False, tools_on_follow_up=False)


@pytest.mark.parametrize("name", TOOLS)
def test_streamed_tool_call_without_arguments(client, fresh, name):
    """A tool that takes no arguments: the streamed arguments still assemble into JSON ("{}")."""
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time now",
                                               "parameters": {"type": "object", "properties": {}}}}]
    args, calls = "", set()
    for c in client.chat.completions.create(model=name, stream=True, tools=tools,
                                            messages=[{"role": "user", "content": "What time is it?"}]):
        for tc in (c.choices[0].delta.tool_calls or ()) if c.choices else ():
            calls.add(tc.index)
            args += (tc.function.arguments or "") if tc.function else ""
    assert calls == {0} and json.loads(args) == {}


@pytest.mark.parametrize("name", VISION)
def test_image(client, fresh, name):
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": PNG}}]}])
    content = r.choices[0].message.content
    assert content.startswith("echo: What is in this picture?") and "image" in content
    if PROVIDER[name] != "openai":   # the provider mocks decode the image they were given
        assert "70 bytes" in content


@pytest.mark.parametrize("name", ["openai/gpt-4.1", "anthropic/claude-sonnet"])
def test_cborg_prompt_caching_example(client, fresh, name):
    """The example of the CBorg documentation, as written."""
    seen = []
    for _ in range(2):
        r = client.chat.completions.with_raw_response.create(model=name, messages=[
            {"role": "system", "content": "Always talk like a pirate. " * 200, "cache_control": {"type": "ephemeral"}},
            {"role": "user", "content": "What letter comes after A in the alphabet?"}])
        data = json.loads(r.content)
        seen.append((data["usage"]["prompt_tokens_details"]["cached_tokens"], float(r.headers.get("x-litellm-response-cost"))))
    (c1, cost1), (c2, cost2) = seen
    assert c1 == 0 and c2 > 1000
    assert cost2 < cost1                     # cached input is cheaper


def test_anthropic_cache_write_and_read_are_priced(client, fresh):
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Context. " * 800, "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "Question?"}]
    first = client.chat.completions.with_raw_response.create(model="anthropic/claude-opus", messages=msgs)
    second = client.chat.completions.with_raw_response.create(model="anthropic/claude-opus", messages=msgs)
    u1, u2 = json.loads(first.content)["usage"], json.loads(second.content)["usage"]
    assert u1["cache_creation_input_tokens"] > 1000 and u1["prompt_tokens_details"]["cached_tokens"] == 0
    assert u2["cache_creation_input_tokens"] == 0 and u2["prompt_tokens_details"]["cached_tokens"] == u1["cache_creation_input_tokens"]
    assert u1["prompt_tokens"] == u2["prompt_tokens"]      # prompt_tokens includes cached and written tokens
    plain = u1["prompt_tokens"] - u1["cache_creation_input_tokens"]
    # opus: input 15, cache write 18.75, cache read 1.5, output 75 per 1M
    assert float(first.headers["x-litellm-response-cost"]) == pytest.approx(
        (plain * 15 + u1["cache_creation_input_tokens"] * 18.75 + u1["completion_tokens"] * 75) / 1e6)
    assert float(second.headers["x-litellm-response-cost"]) == pytest.approx(
        (plain * 15 + u2["prompt_tokens_details"]["cached_tokens"] * 1.5 + u2["completion_tokens"] * 75) / 1e6)
    # Anthropic's minimum for Haiku 4.5 is 4,096 tokens: the same prompt is not cached there.
    for _ in range(2):
        r = client.chat.completions.create(model="anthropic/claude-haiku", messages=msgs)
        assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_gemini_implicit_cache_reported(client, fresh):
    msgs = [{"role": "system", "content": "Background. " * 600}, {"role": "user", "content": "Go."}]
    r1 = client.chat.completions.create(model="google/gemini-flash", messages=msgs)
    r2 = client.chat.completions.create(model="google/gemini-flash", messages=msgs)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.usage.prompt_tokens_details.cached_tokens >= 1024
    assert r2.usage.prompt_tokens == r1.usage.prompt_tokens     # Gemini's prompt count includes the cached part


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("openai/o")])
def test_openai_reasoning_models_take_common_parameters(client, fresh, name):
    """max_tokens and temperature as researchers pass them; the OpenAI mock refuses them as the API does."""
    r = client.chat.completions.create(model=name, max_tokens=50, temperature=0.2, reasoning_effort="low",
                                       messages=[{"role": "system", "content": "Be brief.", "cache_control": {"type": "ephemeral"}},
                                                 {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "echo: hi"
    body = fresh.openai.requests[-1]["json"]
    assert body["max_completion_tokens"] == 50 and "max_tokens" not in body and "temperature" not in body
    assert "cache_control" not in body["messages"][0]
    if name == "openai/o1-mini":      # it refuses reasoning_effort ("Unknown parameter"): left out
        assert "reasoning_effort" not in body
    else:
        assert body["reasoning_effort"] == "low"


def test_openai_tool_cache_control_is_left_out(client, fresh):
    """Anthropic-style clients mark tools with cache_control; OpenAI refuses unknown tool fields."""
    tools = [{**WEATHER[0], "cache_control": {"type": "ephemeral"}}]
    r = client.chat.completions.create(model="openai/gpt-4.1", tools=tools,
                                       messages=[{"role": "user", "content": "Weather in Berkeley?"}])
    assert r.choices[0].finish_reason == "tool_calls"
    assert "cache_control" not in fresh.openai.requests[-1]["json"]["tools"][0]
