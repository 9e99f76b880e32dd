"""POST /v1/responses through the openai SDK's responses client, for every provider family (openai/* passed
through, the others translated): non-stream, stream, tools, images, usage and cost; stored responses
(previous_response_id, retrieve, delete, input_items) readable only by the key that made them, on SQLite
and PostgreSQL; compact; streams that always end in a terminal event."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import running_gateway
from tests.mocks.openai_mock import TOOL_ARGS, Scripted
from tests.providers.conftest import fast_retries
from tests.providers.test_commercial_models import PNG

MODELS = ["openai/gpt-4o", "anthropic/claude-sonnet", "xai/grok", "google/gemini-flash", "aws/llama-3.1-70b"]
TOOL = {"type": "function", "name": "get_weather", "description": "Current weather at a place",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                       "required": ["location"]}}


@pytest.fixture
def client(cgw, ckey, fresh):
    return openai.OpenAI(api_key=ckey, base_url=cgw.url, max_retries=0)


@pytest.mark.parametrize("name", MODELS)
def test_plain_call_usage_and_cost(client, cgw, name):
    raw = client.responses.with_raw_response.create(model=name, instructions="Be brief.",
                                                    input="What is the capital of France?")
    r = raw.parse()
    assert r.object == "response" and r.status == "completed"
    assert r.output_text.endswith("What is the capital of France?")
    u = r.usage
    assert u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    p = cgw.gw.catalog.resolve(name).model.price
    cached = u.input_tokens_details.cached_tokens
    write = 0 if name != "anthropic/claude-sonnet" else None
    cost = float(raw.headers["x-litellm-response-cost"])
    if write is not None:
        assert cost == pytest.approx(((u.input_tokens - cached) * p.input + cached * (p.cached_input or p.input)
                                      + u.output_tokens * p.output) / 1e6)
    assert cost > 0


@pytest.mark.parametrize("name", MODELS)
def test_stream_ends_in_response_completed(client, name):
    events = list(client.responses.create(model=name, input="Count to three", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    assert [e.sequence_number for e in events] == sorted(e.sequence_number for e in events)
    final = events[-1].response
    assert final.output_text.endswith("Count to three") and final.usage.output_tokens > 0
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text


@pytest.mark.parametrize("name", MODELS)
def test_function_call_round_trip(client, name):
    first = client.responses.create(model=name, input="Weather in Berkeley?", tools=[TOOL])
    call = next(o for o in first.output if o.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == TOOL_ARGS
    second = client.responses.create(model=name, tools=[TOOL], input=[
        {"role": "user", "content": "Weather in Berkeley?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}])
    assert second.output_text == "The tool said: 18 C, sunny"


@pytest.mark.parametrize("name", MODELS)
def test_streamed_function_call(client, name):
    events = list(client.responses.create(model=name, input="Weather in Berkeley?", tools=[TOOL], stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    call = next(i for i in done if i.type == "function_call")
    assert json.loads(call.arguments) == TOOL_ARGS
    assert events[-1].type == "response.completed"


@pytest.mark.parametrize("name", ["openai/gpt-4o", "anthropic/claude-sonnet", "google/gemini-flash"])
def test_image(client, name):
    r = client.responses.create(model=name, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": PNG}]}])
    assert "What is this?" in r.output_text


def test_codex_tool_kinds_translate_back(client, fresh):
    """A custom (freeform) tool and local_shell come back as the item kinds Codex declared."""
    tools = [{"type": "custom", "name": "apply_patch", "description": "Apply a patch",
              "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
             {"type": "local_shell"}, {"type": "web_search"}]
    fresh.anthropic.script.append(Scripted(tool=("apply_patch", {"input": "*** Begin Patch"})))
    r = client.responses.create(model="anthropic/claude-sonnet", input="patch it", tools=tools)
    item = r.output[0]
    assert item.type == "custom_tool_call" and item.input == "*** Begin Patch"
    sent = fresh.anthropic.requests[-1]["json"]
    assert [t["name"] for t in sent["tools"]] == ["apply_patch", "local_shell"]     # web_search is hosted: dropped
    fresh.anthropic.script.append(Scripted(tool=("local_shell", {"command": ["ls", "-l"]})))
    r = client.responses.create(model="anthropic/claude-sonnet", input="list", tools=tools)
    assert r.output[0].type == "local_shell_call" and r.output[0].action.command == ["ls", "-l"]


def test_store_and_previous_response_id(client, cgw, fresh):
    first = client.responses.create(model="anthropic/claude-sonnet", input="My name is Ada.")
    second = client.responses.create(model="google/gemini-flash", input="What is my name?",
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    sent = fresh.gemini.requests[-1]["json"]["contents"]
    texts = [p.get("text", "") for c in sent for p in c["parts"]]
    assert any("My name is Ada." in t for t in texts) and any(t.startswith("echo:") for t in texts)
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    items = client.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data][:1] == ["message"] and len(items.data) == 3
    # a stored translated conversation continues on a native model: OpenAI gets the whole history
    third = client.responses.create(model="openai/gpt-4o", input="And again?", previous_response_id=second.id)
    sent = fresh.openai.requests[-1]["json"]
    assert "previous_response_id" not in sent and len(sent["input"]) == 5
    assert third.output_text == "echo: And again?"
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_only_the_owner_reads_a_stored_response(client, cgw, fresh):
    r = client.responses.create(model="anthropic/claude-sonnet", input="private")
    native = client.responses.create(model="openai/gpt-4o", input="private too")
    other = openai.OpenAI(api_key=cgw.new_key("someone-else@lbl.gov"), base_url=cgw.url, max_retries=0)
    for rid in (r.id, native.id):
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(rid)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(rid)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model="openai/gpt-4o", input="continue", previous_response_id=rid)
    assert client.responses.retrieve(native.id).output_text == "echo: private too"   # read from OpenAI
    assert fresh.openai.requests[-1]["path"] == f"/v1/responses/{native.id}"


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model="anthropic/claude-sonnet", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_compact(client, cgw, fresh):
    r = httpx.post(cgw.url + "/v1/responses/compact", headers={"Authorization": f"Bearer {client.api_key}"},
                   json={"model": "openai/gpt-4o", "input": [{"role": "user", "content": "hello"}],
                         "instructions": "x"})
    assert r.status_code == 200 and r.json()["output"][0]["type"] == "message"
    r = httpx.post(cgw.url + "/v1/responses/compact", headers={"Authorization": f"Bearer {client.api_key}"},
                   json={"model": "anthropic/claude-sonnet", "input": "hello"})
    assert r.status_code == 404 and "compact" in r.json()["error"]["message"]


def test_upstream_failure_mid_stream_ends_in_response_failed(client, cgw, fresh):
    fresh.anthropic.script.append(Scripted(error_after=4))
    events = list(client.responses.create(model="anthropic/claude-sonnet", input="hello there friend", stream=True))
    assert events[-1].type == "response.failed"
    assert "Overloaded" in events[-1].response.error.message
    fresh.openai.script.append(Scripted(cut_after=5))
    raw = httpx.post(cgw.url + "/v1/responses", headers={"Authorization": f"Bearer {client.api_key}"},
                     json={"model": "openai/gpt-4o", "input": "hello there friend", "stream": True}, timeout=30)
    assert raw.text.rstrip().splitlines()[-1].startswith("data: ") and '"response.failed"' in raw.text


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model="anthropic/claude-sonnet", input="one two three four five", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_errors_in_openai_shape(client, cgw):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope/none", input="x")
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="anthropic/claude-sonnet", input="x", previous_response_id="resp_missing")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="anthropic/claude-sonnet", input=42)


@pytest.mark.services
def test_stored_responses_on_postgresql(tmp_path, mocks, pg_url):
    """Any replica sharing the database continues a conversation."""
    with running_gateway(tmp_path / "a", mocks.openai, edit=fast_retries, env=mocks.env(), db=pg_url) as a, \
            running_gateway(tmp_path / "b", mocks.openai, edit=fast_retries, env=mocks.env(), db=pg_url) as b:
        key = a.new_key()
        first = openai.OpenAI(api_key=key, base_url=a.url).responses.create(model="xai/grok", input="My name is Ada.")
        other = openai.OpenAI(api_key=key, base_url=b.url)
        second = other.responses.create(model="xai/grok", input="Name?", previous_response_id=first.id)
        assert other.responses.retrieve(first.id).output_text == first.output_text
        sent = mocks.openai.requests[-1]["json"]["messages"]
        assert sent[0]["content"] == "My name is Ada." and second.status == "completed"


def test_retention_hides_and_purges_old_responses(client, cgw):
    import time
    r = client.responses.create(model="anthropic/claude-sonnet", input="old")
    cgw.run(cgw.gw.responses.flush())
    rec = cgw.run(cgw.gw.store.get_response(r.id))
    rec.created_at = time.time() - cgw.gw.catalog.conf.responses.retention_s - 10
    cgw.run(cgw.gw.store.put_responses([rec]))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert cgw.run(cgw.gw.store.purge_responses(time.time() - cgw.gw.catalog.conf.responses.retention_s)) >= 1
    assert cgw.run(cgw.gw.store.get_response(r.id)) is None
