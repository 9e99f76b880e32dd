"""Structured outputs on every commercial chat model, and token-array embeddings, through a real
gateway and the provider mocks (which answer as the real APIs do: JSON valid against the schema)."""
from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import running_gateway
from tests.providers.conftest import commercial_models, fast_retries

BEDROCK_CLAUDE = "anthropic.claude-sonnet-4-5-20250929-v1:0"


class Person(BaseModel):
    name: str
    age: int
    languages: list[str]


def _edit(conf: dict) -> None:
    fast_retries(conf)
    conf["models"] += [
        {"name": "aws/claude-sonnet", "provider": "aws", "model": BEDROCK_CLAUDE, "supports_function_calling": True},
        {"name": "openai/text-embedding-3-small", "provider": "openai", "model": "text-embedding-3-small",
         "mode": "embedding"}]


@pytest.fixture(scope="module")
def sgw(mocks, tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("sgw"), mocks.openai, edit=_edit, env=mocks.env(),
                         request_logs=False) as g:   # (its last flush would reach the terminal)
        yield g


@pytest.fixture(scope="module")
def client(sgw):
    return openai.OpenAI(api_key=sgw.new_key(), base_url=sgw.url, max_retries=0)


CHAT = [m["name"] for m in commercial_models() if m.get("mode", "chat") == "chat"] + ["aws/claude-sonnet"]
# Refused with a 400 naming response_format: Bedrock gives a forced tool to Anthropic and Nova models only,
# and OpenAI's o1-mini has no structured outputs.
REFUSED = {n for n in CHAT if n.startswith("aws/") and n != "aws/claude-sonnet"} | {"openai/o1-mini"}
MSGS = [{"role": "user", "content": "Ada Lovelace, 36, wrote English and French. Answer in JSON."}]


def _sent(mocks, name: str) -> dict:
    return mocks.by_provider(name.split("/")[0]).requests[-1]["json"]


@pytest.mark.parametrize("name", CHAT)
def test_parse_with_a_pydantic_model(client, fresh, name):
    if name in REFUSED:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.parse(model=name, messages=MSGS, response_format=Person)
        assert "response_format" in (e.value.body.get("param") or "") + e.value.message
        return
    r = client.chat.completions.parse(model=name, messages=MSGS, response_format=Person)
    assert isinstance(r.choices[0].message.parsed, Person)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    sent = _sent(fresh, name)
    if name in ("anthropic/claude-opus",):          # no structured outputs: a forced tool
        assert sent["tool_choice"] == {"type": "tool", "name": "json_tool_call"}
        assert "output_config" not in sent
    elif name.startswith("anthropic/"):
        fmt = sent["output_config"]["format"]
        assert fmt["type"] == "json_schema" and fmt["schema"]["additionalProperties"] is False
        assert "tools" not in sent
    elif name == "aws/claude-sonnet":
        assert sent["toolConfig"]["toolChoice"] == {"tool": {"name": "json_tool_call"}}
    elif name.startswith("google/"):
        assert sent["generationConfig"]["responseMimeType"] == "application/json"
        assert sent["generationConfig"]["responseJsonSchema"]["required"] == ["name", "age", "languages"]
    else:
        assert sent["response_format"]["json_schema"]["strict"] is True


@pytest.mark.parametrize("name", [n for n in CHAT if n not in REFUSED])
def test_streamed_json_equals_the_whole(client, fresh, name):
    kw = dict(model=name, messages=MSGS, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "strict": True, "schema": {**Person.model_json_schema(), "additionalProperties": False}}})
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == json.loads(whole.message.content)
    Person.model_validate_json(text)
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("name", ["anthropic/claude-sonnet", "anthropic/claude-opus", "aws/claude-sonnet",
                                  "google/gemini-flash", "openai/gpt-4o"])
def test_json_object(client, fresh, name):
    r = client.chat.completions.create(model=name, messages=MSGS, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    if name.startswith(("anthropic/", "aws/")):     # no schema to give structured outputs: the forced tool
        assert "json_tool_call" in json.dumps(_sent(fresh, name))


def test_embeddings_token_arrays(sgw, client, fresh, monkeypatch):
    """openai/* embedding models get token arrays as sent; others would get them as text (the CPU
    engine's own test checks what it embeds: tests/test_engines_cpu.py)."""
    ids = [[15339, 1917], [9906, 11, 1268, 527, 499, 30]]
    r = client.embeddings.create(model="openai/text-embedding-3-small", input=ids)
    assert len(r.data) == 2
    assert fresh.openai.requests[-1]["json"]["input"] == ids


def test_token_arrays_decode_to_text():
    from router.providers import token_arrays
    assert token_arrays.decode([15339, 1917]) == "hello world"
    assert token_arrays.decode([[15339, 1917], [9906, 11, 1268, 527, 499, 30]]) == ["hello world",
                                                                                   "Hello, how are you?"]
    assert not token_arrays.is_token_input(["hello"]) and not token_arrays.is_token_input("hello")
    for bad in ([[1, -2]], [[]], [100257], [[1], "x"], [1.5]):
        with pytest.raises(Exception) as e:
            token_arrays.decode(bad)
        assert getattr(e.value, "status", None) == 400 and e.value.param == "input"
