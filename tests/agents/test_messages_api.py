"""POST /v1/messages through the official anthropic SDK, for every provider family: non-stream, stream,
tools, images, cache_control, usage and cost; errors in Anthropic's shape; count_tokens; the model list
Claude Code reads; aliases and fallbacks; the same policy as chat (allow-lists, ledger rows)."""
from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest

from tests.mocks.openai_mock import TOOL_ARGS, Scripted
from tests.providers.test_commercial_models import PNG

MODELS = ["anthropic/claude-sonnet", "openai/gpt-4o", "xai/grok", "google/gemini-flash", "aws/llama-3.1-70b"]
VISION = ["anthropic/claude-sonnet", "openai/gpt-4o", "google/gemini-flash"]
WEATHER = {"name": "get_weather", "description": "Current weather at a place",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"},
                                                             "unit": {"type": "string", "enum": ["c", "f"]}},
                            "required": ["location"]}}


@pytest.fixture
def client(cgw, ckey, fresh):
    return anthropic.Anthropic(api_key=ckey, base_url=cgw.url, max_retries=0)


def _price(cgw, name):
    return cgw.gw.catalog.resolve(name).model.price


@pytest.mark.parametrize("name", MODELS)
def test_plain_call_usage_and_cost(client, cgw, name):
    raw = client.messages.with_raw_response.create(
        model=name, max_tokens=100, system="Be brief.",
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    m = raw.parse()
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text.endswith("What is the capital of France?")
    assert m.stop_reason == "end_turn"
    u = m.usage
    assert u.input_tokens > 0 and u.output_tokens > 0
    p = _price(cgw, name)
    prompt = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    assert float(raw.headers["x-litellm-response-cost"]) == pytest.approx(
        (prompt * p.input + u.output_tokens * p.output) / 1e6)


@pytest.mark.parametrize("name", MODELS)
def test_stream_event_sequence(client, name):
    with client.messages.stream(model=name, max_tokens=100,
                                messages=[{"role": "user", "content": "Count to three"}]) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_delta" in events and "message_delta" in events
    assert final.content[0].text.endswith("Count to three")
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert final.stop_reason == "end_turn"


def test_stream_message_start_carries_input_usage(cgw, ckey, fresh):
    """Translated streams: message_start says the input count known so far (never zero), the last
    message_delta the upstream's exact cumulative usage."""
    body = {"model": "openai/gpt-4o", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "hello " * 200}]}
    with httpx.stream("POST", cgw.url + "/v1/messages", json=body, headers={"x-api-key": ckey}, timeout=30) as r:
        text = r.read().decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    start = events[0]["message"]["usage"]
    last = [e for e in events if e["type"] == "message_delta"][-1]["usage"]
    assert start["input_tokens"] >= last["input_tokens"] > 0
    assert last["output_tokens"] > 0
    assert [e["type"] for e in events][-1] == "message_stop"


@pytest.mark.parametrize("name", MODELS)
def test_tool_use_round_trip(client, name):
    msgs = [{"role": "user", "content": "Weather in Berkeley?"}]
    first = client.messages.create(model=name, max_tokens=200, tools=[WEATHER], messages=msgs)
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == TOOL_ARGS
    msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}]}]
    second = client.messages.create(model=name, max_tokens=200, tools=[WEATHER], messages=msgs)
    assert second.content[0].text == "The tool said: 18 C, sunny"


@pytest.mark.parametrize("name", MODELS)
def test_streamed_tool_call_assembles(client, name):
    with client.messages.stream(model=name, max_tokens=200, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather in Berkeley?"}]) as s:
        final = s.get_final_message()
    call = next(b for b in final.content if b.type == "tool_use")
    assert call.input == TOOL_ARGS and final.stop_reason == "tool_use"


@pytest.mark.parametrize("name", VISION)
def test_image(client, name):
    data = PNG.split(",", 1)[1]
    m = client.messages.create(model=name, max_tokens=100, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What is this?"}]}])
    assert "What is this?" in m.content[0].text


def test_cache_control_second_call_reads_the_cache(client, cgw):
    system = [{"type": "text", "text": "You are a careful assistant. " * 400, "cache_control": {"type": "ephemeral"}}]
    msgs = [{"role": "user", "content": "Hello"}]
    first = client.messages.with_raw_response.create(model="anthropic/claude-sonnet", max_tokens=50, system=system,
                                                     messages=msgs)
    second = client.messages.with_raw_response.create(model="anthropic/claude-sonnet", max_tokens=50, system=system,
                                                      messages=msgs)
    u1, u2 = first.parse().usage, second.parse().usage
    assert u1.cache_creation_input_tokens > 1000 and u1.cache_read_input_tokens == 0
    assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens and u2.cache_creation_input_tokens == 0
    p = _price(cgw, "anthropic/claude-sonnet")
    assert float(second.headers["x-litellm-response-cost"]) == pytest.approx(
        (u2.input_tokens * p.input + u2.cache_read_input_tokens * p.cached_input + u2.output_tokens * p.output) / 1e6)


def test_passthrough_keeps_unknown_fields_and_betas(cgw, ckey, fresh):
    """anthropic/*: the body as sent (a field the gateway does not know included) and the beta header."""
    body = {"model": "anthropic/claude-haiku", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}
    r = httpx.post(cgw.url + "/v1/messages", json=body, timeout=30,
                   headers={"x-api-key": ckey, "anthropic-beta": "context-management-2025-06-27",
                            "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    sent = fresh.anthropic.requests[-1]
    assert sent["json"]["context_management"] == body["context_management"]
    assert sent["json"]["model"] == "claude-haiku-4-5"
    assert sent["headers"]["anthropic-beta"] == "context-management-2025-06-27"
    r = httpx.post(cgw.url + "/v1/messages", json=body, headers={"x-api-key": ckey}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "error"     # without the beta, Anthropic refuses it


def test_translation_drops_what_has_no_counterpart(client, fresh):
    """Claude Code's Anthropic-only fields never turn into a 400 on other providers."""
    m = client.messages.create(
        model="openai/gpt-4o", max_tokens=64000, messages=[{"role": "user", "content": "hi"}],
        extra_body={"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
                    "context_management": {"edits": []}, "metadata": {"user_id": "x" * 200},
                    "brand_new_field": {"a": 1}},
        extra_headers={"anthropic-beta": "context-management-2025-06-27"}, timeout=60)
    assert m.content[0].text == "echo: hi"
    sent = fresh.openai.requests[-1]["json"]
    assert sent["max_tokens"] == 16384                     # held to gpt-4o's maximum output
    assert not {"thinking", "output_config", "context_management", "metadata", "brand_new_field"} & set(sent)


def test_reasoning_effort_where_the_model_reasons(client, fresh):
    client.messages.create(model="openai/o3-mini", max_tokens=5000, messages=[{"role": "user", "content": "hi"}],
                           thinking={"type": "enabled", "budget_tokens": 4096})
    sent = fresh.openai.requests[-1]["json"]
    assert sent["reasoning_effort"] == "medium" and sent["max_completion_tokens"] == 5000


def test_errors_in_anthropic_shape(cgw, ckey, fresh):
    def post(body, key=ckey):
        return httpx.post(cgw.url + "/v1/messages", json=body, headers={"x-api-key": key} if key else {}, timeout=30)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [(post({"model": "openai/gpt-4o", "max_tokens": 5, "messages": msgs}, key=None), 401,
              "authentication_error"),
             (post({"model": "nope/nothing", "max_tokens": 5, "messages": msgs}), 404, "not_found_error"),
             (post({"model": "openai/gpt-4o", "messages": msgs}), 400, "invalid_request_error"),
             (post({"model": "lbl/nomic-embed-text", "max_tokens": 5, "messages": msgs}), 400,
              "invalid_request_error")]
    for r, status, typ in cases:
        assert r.status_code == status, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == typ
    limited = cgw.new_key(models=["openai/gpt-4o"])
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(api_key=limited, base_url=cgw.url, max_retries=0).messages.create(
            model="anthropic/claude-haiku", max_tokens=5, messages=msgs)
    fresh.anthropic.script.append(Scripted(status=529, body={"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}}, headers={"x-should-retry": "false"}))
    r = post({"model": "anthropic/claude-haiku", "max_tokens": 5, "messages": msgs})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"


def test_count_tokens(client, fresh):
    msgs = [{"role": "user", "content": "How many tokens is this sentence, really?"}]
    exact = client.messages.count_tokens(model="anthropic/claude-sonnet", messages=msgs, system="Be brief.")
    asked = httpx.post(fresh.anthropic.url + "/v1/messages/count_tokens", headers={
        "x-api-key": fresh.anthropic.api_key, "anthropic-version": "2023-06-01"}, json={
        "model": "claude-sonnet-4-5", "messages": msgs, "system": "Be brief."}).json()
    assert exact.input_tokens == asked["input_tokens"]       # Anthropic's own count
    assert fresh.anthropic.requests[-2]["path"] == "/v1/messages/count_tokens"
    est = client.messages.count_tokens(model="openai/gpt-4o", messages=msgs, system="Be brief.")
    sent = client.messages.create(model="openai/gpt-4o", max_tokens=5, messages=msgs, system="Be brief.")
    assert est.input_tokens >= sent.usage.input_tokens    # the estimate does not undercount what was billed


def test_count_tokens_within_the_keys_limits(cgw, fresh):
    # each may call Anthropic with the lab's key: a key at its request rate is refused, as for messages
    c = anthropic.Anthropic(api_key=cgw.new_key("counter@lbl.gov", rpm_limit=2), base_url=cgw.url, max_retries=0)
    ask = {"model": "anthropic/claude-sonnet", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        assert c.messages.count_tokens(**ask).input_tokens > 0
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.count_tokens(**ask)
    assert e.value.body["type"] == "error" and e.value.response.headers.get("retry-after")
    assert sum(r["path"] == "/v1/messages/count_tokens" for r in fresh.anthropic.requests) == 2


def test_models_in_anthropic_shape(cgw, ckey):
    r = httpx.get(cgw.url + "/v1/models", headers={"x-api-key": ckey, "anthropic-version": "2023-06-01"})
    body = r.json()
    assert body["has_more"] is False and {"type", "id", "display_name", "created_at"} <= set(body["data"][0])
    assert "anthropic/claude-sonnet" in [m["id"] for m in body["data"]]
    page = anthropic.Anthropic(api_key=ckey, base_url=cgw.url).models.list()
    assert "anthropic/claude-sonnet" in [m.id for m in page.data]
    one = httpx.get(cgw.url + "/v1/models/anthropic/claude-sonnet",
                    headers={"x-api-key": ckey, "anthropic-version": "2023-06-01"}).json()
    assert one["type"] == "model" and one["id"] == "anthropic/claude-sonnet"
    assert httpx.get(cgw.url + "/v1/models", headers={"x-api-key": ckey}).json()["object"] == "list"


def test_alias_prompt_precedes_the_callers_system(client, fresh):
    client.messages.create(model="lbl/cborg-chat:latest", max_tokens=10, system="Caller system.",
                           messages=[{"role": "user", "content": "hi"}])
    sent = fresh.openai.requests[-1]["json"]["messages"]
    assert sent[0]["role"] == "system" and "CBorg" in sent[0]["content"]
    assert sent[1] == {"role": "system", "content": "Caller system."}


def test_ledger_rows_name_the_endpoint(client, cgw):
    client.messages.create(model="google/gemini-flash", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    time.sleep(0.7)
    rows = cgw.run(cgw.gw.store.ledger_rows())
    row = next(r for r in rows if r["model"] == "google/gemini-flash")
    assert row["endpoint"] == "messages" and row["cost"] > 0 and row["status"] == 200
