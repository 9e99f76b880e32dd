"""The OpenAI surface through the official openai SDK, as researchers use it."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import httpx
import openai
import pytest

from tests.helpers.servers import ROOT


@pytest.fixture
def client(gateway, api_key, fresh_mock):
    return openai.OpenAI(api_key=api_key, base_url=gateway.url, max_retries=0)


def last_json(mock) -> dict:
    return mock.requests[-1]["json"]


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_chat_both_base_urls(gateway, api_key, fresh_mock, suffix):
    c = openai.OpenAI(api_key=api_key, base_url=gateway.url + suffix, max_retries=0)
    r = c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "What is 2+2?"}],
                                  temperature=0.0)
    assert r.choices[0].message.content == "echo: What is 2+2?"
    assert r.model == "gpt-4o-2024-08-06"          # the underlying model, as CBorg documents
    assert r.usage.prompt_tokens > 0 and r.usage.prompt_tokens_details.cached_tokens == 0
    sent = last_json(fresh_mock)
    assert sent["model"] == "gpt-4o" and sent["temperature"] == 0.0
    # the client's key never reaches the provider; the provider key is the gateway's
    assert fresh_mock.requests[-1]["headers"]["Authorization"] == f"Bearer {fresh_mock.api_key}"


def test_module_level_client(gateway, api_key, fresh_mock, monkeypatch):
    monkeypatch.setattr(openai, "api_key", api_key)
    monkeypatch.setattr(openai, "base_url", gateway.url)
    monkeypatch.setattr(openai, "max_retries", 0)
    monkeypatch.setattr(openai, "_client", None)
    r = openai.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "echo: hi"


def test_async_client(gateway, api_key, fresh_mock):
    async def main():
        c = openai.AsyncOpenAI(api_key=api_key, base_url=gateway.url, max_retries=0)
        rs = await asyncio.gather(*[c.chat.completions.create(
            model="openai/gpt-4.1", messages=[{"role": "user", "content": f"n{i}"}]) for i in range(8)])
        await c.close()
        return rs
    rs = asyncio.run(main())
    assert sorted(r.choices[0].message.content for r in rs) == sorted(f"echo: n{i}" for i in range(8))


def test_async_client_streams(gateway, api_key, fresh_mock):
    async def main():
        c = openai.AsyncOpenAI(api_key=api_key, base_url=gateway.url, max_retries=0)
        out = []
        for i in range(3):
            s = await c.chat.completions.create(model="openai/gpt-4o", stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": f"async {i}"}])
            out.append([ch async for ch in s])
        await c.close()
        return out
    for i, chunks in enumerate(asyncio.run(main())):
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == f"echo: async {i}"
        assert chunks[-1].usage.total_tokens > 0


def test_raw_and_streaming_response_on_streams(client, fresh_mock):
    raw = client.chat.completions.with_raw_response.create(
        model="openai/gpt-4o", stream=True, messages=[{"role": "user", "content": "raw stream"}])
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.headers["x-request-id"]
    text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert text == "echo: raw stream"
    with client.chat.completions.with_streaming_response.create(
            model="openai/gpt-4o", stream=True, messages=[{"role": "user", "content": "lines"}]) as r:
        assert r.headers["x-request-id"].startswith("req-")
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3


@pytest.mark.parametrize("header", ["authorization-bare", "x-api-key", "api-key"])
def test_other_key_headers(gateway, api_key, fresh_mock, header):
    """Anthropic's SDK sends x-api-key, Azure-style clients api-key; some tools omit 'Bearer'."""
    h = {"Authorization": api_key} if header == "authorization-bare" else {header: api_key}
    r = httpx.post(gateway.url + "/v1/chat/completions", headers=h,
                   json={"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "k"}]})
    assert r.status_code == 200, r.text
    assert httpx.post(gateway.url + "/v1/chat/completions", headers={header if header != "authorization-bare"
                      else "Authorization": "sk-wrong-key-123456"},
                      json={"model": "openai/gpt-4o", "messages": []}).status_code == 401


def test_head_and_wrong_method(gateway, api_key):
    h = {"Authorization": f"Bearer {api_key}"}
    r = httpx.head(gateway.url + "/v1/models", headers=h)
    assert r.status_code == 200 and r.content == b""
    r = httpx.delete(gateway.url + "/v1/chat/completions", headers=h)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_raw_response_headers(client, fresh_mock):
    raw = client.chat.completions.with_raw_response.create(
        model="openai/gpt-4o", messages=[{"role": "user", "content": "hello there"}])
    data = json.loads(raw.content)
    cost = float(raw.headers["x-litellm-response-cost"])
    u = data["usage"]
    assert cost == pytest.approx((u["prompt_tokens"] * 5 + u["completion_tokens"] * 15) / 1e6)
    assert raw.headers["x-request-id"].startswith("req-")
    assert raw.parse().choices[0].message.content == "echo: hello there"


def test_stream_without_usage_strips_usage_chunk(client, fresh_mock):
    chunks = list(client.chat.completions.create(model="openai/gpt-4o", stream=True,
                                                 messages=[{"role": "user", "content": "one two three"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)              # the usage chunk (choices: []) is gone
    # ...but the gateway asked the upstream for usage, to account the request
    assert last_json(fresh_mock)["stream_options"] == {"include_usage": True}


def test_stream_with_usage_has_cost(client, fresh_mock):
    chunks = list(client.chat.completions.create(model="openai/gpt-4o", stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "count"}]))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens_details.cached_tokens == 0
    extra = last.usage.model_extra or {}
    assert extra["cost"] == pytest.approx((last.usage.prompt_tokens * 5 + last.usage.completion_tokens * 15) / 1e6)


def test_stream_chunks_arrive_as_sent(gateway, api_key, fresh_mock):
    """Not buffered: the first chunk reaches the client long before the upstream's last one is sent."""
    fresh_mock.chunk_delay = 0.25
    c = openai.OpenAI(api_key=api_key, base_url=gateway.url, max_retries=0)
    got = []
    for ch in c.chat.completions.create(model="openai/gpt-4o", stream=True,
                                        messages=[{"role": "user", "content": "a b c d e f"}]):
        got.append(time.time())
    assert len(got) >= 6
    last_sent = fresh_mock.sent_at[-1]
    assert got[0] < last_sent - 1.0, (got[0], last_sent)
    # each chunk reached the client within a short time of being sent
    for sent, recv in zip(fresh_mock.sent_at, got):
        assert recv - sent < 0.2


def test_unknown_params_pass_through(client, fresh_mock):
    client.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "x"}],
                                   extra_body={"top_k": 7, "repetition_penalty": 1.1, "custom": {"a": [1, 2]}},
                                   seed=3, logit_bias={"50256": -100})
    sent = last_json(fresh_mock)
    assert sent["top_k"] == 7 and sent["repetition_penalty"] == 1.1 and sent["custom"] == {"a": [1, 2]}
    assert sent["seed"] == 3 and sent["logit_bias"] == {"50256": -100}


def test_alias_prompt_first_then_callers_system(client, fresh_mock):
    prompt = (ROOT / "prompts" / "cborg-chat.md").read_text().strip()
    r = client.chat.completions.create(model="lbl/cborg-chat:latest", temperature=0.0, messages=[
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}])
    sent = last_json(fresh_mock)
    assert sent["model"] == "meta-llama/Llama-3.3-70B-Instruct"
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert sent["messages"][0]["content"] == prompt
    assert sent["messages"][1]["content"] == "Answer in French."
    assert r.model == "meta-llama/Llama-3.3-70B-Instruct"


@pytest.mark.parametrize("name", ["cborg-coder", "lbl/cborg-coder", "cborg-coder:latest", "lbl/cborg-coder:latest"])
def test_alias_spellings_and_default_temperature(client, fresh_mock, name):
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "code"}])
    sent = last_json(fresh_mock)
    assert sent["model"] == "Qwen/Qwen2.5-Coder-32B-Instruct"
    assert sent["temperature"] == 0.0
    assert sent["messages"][0]["content"].startswith("You are CBorg Coder")


def test_alias_temperature_default_does_not_override_caller(client, fresh_mock):
    client.chat.completions.create(model="lbl/cborg-coder:latest", temperature=0.7,
                                   messages=[{"role": "user", "content": "code"}])
    assert last_json(fresh_mock)["temperature"] == 0.7


@pytest.mark.parametrize("name,underlying", [("openai/chatgpt:latest", "gpt-4o"), ("chatgpt", "gpt-4o"),
                                             ("gpt-4.1", "gpt-4.1"), ("lbl/llama:latest", "meta-llama/Llama-3.3-70B-Instruct")])
def test_moving_aliases_and_bare_names(client, fresh_mock, name, underlying):
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    assert last_json(fresh_mock)["model"] == underlying


def test_completions_and_embeddings(client, fresh_mock):
    r = client.completions.create(model="openai/gpt-4o-mini", prompt="Once upon")
    assert r.choices[0].text == "echo: Once upon"
    e = client.embeddings.create(model="lbl/nomic-embed-text", input=["a", "b"])   # SDK asks for base64
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8
    assert e.usage.prompt_tokens == 2
    streamed = list(client.completions.create(model="openai/gpt-4o-mini", prompt="go on", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "echo: go on"


def test_embeddings_model_on_chat_endpoint_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lbl/nomic-embed-text", messages=[{"role": "user", "content": "x"}])
    assert "embedding model" in str(e.value)


def test_models_list_and_retrieve(client, gateway, api_key):
    ids = [m.id for m in client.models.list()]
    for name in ("lbl/cborg-chat:latest", "openai/gpt-4o", "aws/llama-3.1-405b", "anthropic/claude:latest"):
        assert name in ids
    m = client.models.retrieve("lbl/cborg-chat:latest")
    assert m.id == "lbl/cborg-chat:latest" and m.owned_by == "lbl"
    for path in ("/models/lbl/cborg-chat:latest", "/v1/models/lbl%2Fcborg-chat%3Alatest", "/v1/models/cborg-chat"):
        r = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {api_key}"})
        assert r.status_code == 200 and r.json()["id"] == "lbl/cborg-chat:latest", path
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope/nothing")


def test_model_info_shape(gateway, api_key):
    for path in ("/model/info", "/v1/model/info"):
        r = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {api_key}"})
        assert r.status_code == 200
        data = {d["model_name"]: d for d in r.json()["data"]}
    d = data["openai/gpt-4o"]
    assert d["litellm_params"]["model"] == "gpt-4o"
    mi = d["model_info"]
    assert mi["mode"] == "chat" and mi["max_input_tokens"] == 128000
    assert mi["input_cost_per_token"] == pytest.approx(5e-6) and mi["output_cost_per_token"] == pytest.approx(15e-6)
    for f in ("supports_vision", "supports_function_calling", "supports_prompt_caching", "supports_system_messages"):
        assert isinstance(mi[f], bool)
    assert data["lbl/cborg-chat:latest"]["litellm_params"]["model"] == "meta-llama/Llama-3.3-70B-Instruct"
    assert data["lbl/llama"]["model_info"]["input_cost_per_token"] == 0
    assert data["lbl/nomic-embed-text"]["model_info"]["mode"] == "embedding"
    assert data["openai/o1-mini"]["model_info"]["supports_system_messages"] is False


def test_key_info(gateway):
    key = gateway.new_key("info@lbl.gov", key_alias="laptop", models=["openai/gpt-4o"], rpm_limit=60)
    for path in ("/key/info", "/v1/key/info"):
        r = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        info = r.json()["info"]
        assert info["key_alias"] == "laptop" and info["user_id"] == "info@lbl.gov"
        assert info["models"] == ["openai/gpt-4o"] and info["rpm_limit"] == 60
        expires = datetime.fromisoformat(info["expires"].replace("Z", "+00:00")).timestamp()
        assert info["spend"] == 0 and expires > time.time() + 364 * 86400      # ISO 8601, as LiteLLM
        assert info["max_budget"] is None and info["budget_reset_at"] is None  # no key budget configured
        assert key not in r.text


def test_health(gateway):
    assert httpx.get(gateway.url + "/health/liveliness").status_code == 200
    r = httpx.get(gateway.url + "/health/readiness")
    assert r.status_code == 200 and r.json()["db"] == "connected"
