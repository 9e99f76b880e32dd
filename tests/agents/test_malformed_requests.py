"""Malformed fields on the coding agents' APIs are the client's 400, in the API's own error shape, said
before any upstream is called and with nothing counted: Anthropic's body on /v1/messages and
/v1/messages/count_tokens (a block's `source` a string, `tools` a number), OpenAI's on /v1/responses
(fields the Response echoes, such as `metadata`, nested deeper than the gateway can write back)."""
from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import hostile

ANTHROPIC_H = {"anthropic-version": "2023-06-01"}
HI = [{"role": "user", "content": "hi"}]
TRANSLATED = ["openai/gpt-4o-mini", "lbl/llama"]


def _messages_400(r: httpx.Response, *words: str) -> dict:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    assert all(w in body["error"]["message"] for w in words), body
    return body


def _post(cgw, key, path, body):
    return httpx.post(cgw.url + path, json=body, headers={"x-api-key": key, **ANTHROPIC_H}, timeout=30)


def _block(**kw):
    return [{"role": "user", "content": [kw]}]


# (body fields, what the 400 names)
MESSAGES_CASES = [
    ({"messages": _block(type="image", source="x")}, "messages.0.content.0.source"),
    ({"messages": _block(type="image", source=5)}, "messages.0.content.0.source"),
    ({"messages": _block(type="image", source=["x"])}, "messages.0.content.0.source"),
    ({"messages": _block(type="document", source=True)}, "messages.0.content.0.source"),
    ({"messages": _block(type="document", source={"type": "content", "content": 5})},
     "messages.0.content.0.source.content"),
    ({"messages": _block(type="tool_result", tool_use_id="t", content=[{"type": "image", "source": "x"}])},
     "messages.0.content.0.content.0.source"),
    ({"messages": _block(type="tool_result", tool_use_id="t", content=5)}, "messages.0.content.0.content"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content.0"),
    ({"messages": _block(text="no type")}, "messages.0.content.0.type"),
    ({"messages": HI, "tools": 5}, "tools"),
    ({"messages": HI, "tools": ["x"]}, "tools.0"),
    ({"messages": HI, "system": [5]}, "system.0"),
    ({"messages": HI, "system": 5}, "system"),
    ({"messages": HI, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": HI, "thinking": "on"}, "thinking"),
    ({"messages": HI, "thinking": {"type": "enabled", "budget_tokens": "many"}}, "thinking.budget_tokens"),
    ({"messages": HI, "output_config": {"effort": ["high"]}}, None),    # (a list effort: dropped, not a crash)
    ({"messages": HI, "temperature": "hot"}, "temperature"),
]


@pytest.mark.parametrize("model", TRANSLATED)
@pytest.mark.parametrize("fields,names", MESSAGES_CASES)
def test_malformed_messages_are_anthropic_400s_before_any_upstream_call(cgw, ckey, fresh, model, fields, names):
    r = _post(cgw, ckey, "/v1/messages", {"model": model, "max_tokens": 10, **fields})
    if names is None:
        assert r.status_code == 200, r.text[:300]
        return
    _messages_400(r, names)
    assert fresh.openai.requests == []
    r = _post(cgw, ckey, "/v1/messages/count_tokens", {"model": model, **fields})
    _messages_400(r, names)


def test_the_anthropic_sdk_raises_bad_request_on_them(cgw, ckey, fresh):
    client = anthropic.Anthropic(api_key=ckey, base_url=cgw.url, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="openai/gpt-4o-mini", max_tokens=10,
                               messages=_block(type="image", source="x"))
    assert "source" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="lbl/llama", messages=HI, tools=5)


def test_native_passthrough(cgw, ckey, fresh):
    """anthropic/*: the top-level types are checked here (no round trip); the blocks, which the gateway does not
    read on the way through, are left to Anthropic, whose 400 is relayed in its shape. count_tokens checks them."""
    _messages_400(_post(cgw, ckey, "/v1/messages", {"model": "anthropic/claude-haiku", "max_tokens": 10,
                                                     "messages": HI, "tools": 5}), "tools")
    _messages_400(_post(cgw, ckey, "/v1/messages/count_tokens", {"model": "anthropic/claude-haiku",
                                                                  "messages": _block(type="image", source="x")}),
                  "source")
    assert fresh.anthropic.requests == []
    r = _post(cgw, ckey, "/v1/messages", {"model": "anthropic/claude-haiku", "max_tokens": 10,
                                          "messages": _block(type="image", source="x")})
    assert r.status_code == 400 and r.json()["type"] == "error", r.text[:300]


def test_good_blocks_still_pass(cgw, ckey, fresh):
    """What Claude Code sends (tool results with text and images, documents, cache_control) is unchanged."""
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    msgs = [{"role": "user", "content": [
                {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
                {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "c"}]}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
                {"type": "text", "text": "out"}, {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]
    tools = [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = _post(cgw, ckey, path, {"model": "openai/gpt-4o", "max_tokens": 10, "messages": msgs, "tools": tools,
                                    "system": [{"type": "text", "text": "sys"}], "tool_choice": {"type": "auto"},
                                    "thinking": {"type": "enabled", "budget_tokens": 4096}})
        assert r.status_code == 200, r.text[:300]


def test_an_unexpected_error_is_answered_in_anthropic_shape(cgw, ckey, fresh, monkeypatch):
    from router.dialects import anthropic_messages as am

    def broken(body):
        raise RuntimeError("a bug")
    monkeypatch.setattr(am, "estimate_tokens", broken)
    r = _post(cgw, ckey, "/v1/messages/count_tokens", {"model": "openai/gpt-4o", "messages": HI})
    assert r.status_code == 500
    assert r.json() == {"type": "error", "error": {"type": "api_error", "message": "Internal server error."}}
    assert "a bug" not in r.text


ANY = hostile.json_values(["image", "document", "text", "tool_result", "tool_use", "base64", "url", "content"],
                          nonfinite=False, text_size=8, key_size=8, max_leaves=8)
BLOCK_KEYS = st.sampled_from(["type", "source", "content", "text", "input", "name", "id", "tool_use_id",
                              "cache_control", "title", "is_error"])
BLOCK = st.dictionaries(BLOCK_KEYS, ANY, max_size=4) | st.fixed_dictionaries(
    {"type": st.sampled_from(["image", "document", "tool_result"]),
     "source": ANY | st.fixed_dictionaries({"type": st.sampled_from(["base64", "url", "text", "content"]),
                                            "content": ANY, "data": ANY})})
FIELDS = st.fixed_dictionaries({}, optional={
    "system": ANY | st.lists(BLOCK, max_size=2), "tools": ANY | st.lists(st.dictionaries(BLOCK_KEYS, ANY), max_size=2),
    "tool_choice": ANY, "thinking": ANY, "output_config": ANY, "temperature": ANY, "top_p": ANY})


@given(blocks=st.lists(BLOCK | ANY, min_size=1, max_size=3), fields=FIELDS,
       role=st.sampled_from(["user", "assistant"]), path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]),
       model=st.sampled_from([*TRANSLATED, "anthropic/claude-haiku"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
def test_any_block_is_never_a_server_error(cgw, ckey, blocks, fields, role, path, model):
    body = {"model": model, "max_tokens": 10, "messages": [{"role": role, "content": blocks}], **fields}
    r = _post(cgw, ckey, path, body)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()
        assert err["type"] == "error" and set(err["error"]) == {"type", "message"}, err


# -- /v1/responses ----------------------------------------------------------------------------------
RESPONSES_MODELS = ["lbl/llama", "anthropic/claude-haiku", "openai/gpt-4o-mini"]
ECHOED = ["metadata", "tools", "tool_choice", "user", "store", "parallel_tool_calls", "text", "reasoning",
          "temperature", "max_output_tokens"]


def _openai_400(r: httpx.Response, param: str) -> dict:
    """A 400 in OpenAI's shape whose param is `param` (or an item of it: tools[0])."""
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    assert err["param"] == param or err["param"].startswith(param + "["), err
    return err


def _responses(cgw, key, body):
    from tests.providers.test_bad_fields import dumps
    return httpx.post(cgw.url + "/v1/responses", content=dumps(body), timeout=30,
                      headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})


def _no_upstream_call(mocks):
    assert mocks.openai.requests == [] and mocks.anthropic.requests == []


@pytest.mark.parametrize("model", RESPONSES_MODELS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ECHOED)
def test_echoed_fields_nested_deep_are_400s_before_the_upstream(cgw, ckey, fresh, model, stream, field):
    """JSON nested 255-1,024 levels (orjson reads it, cannot write it back) where the Response echoes it:
    before, a 502 after the upstream was called (or a stream cut mid-chunk)."""
    from tests.providers.test_bad_fields import nested
    r = _responses(cgw, ckey, {"model": model, "input": "hi", "max_output_tokens": 20, "stream": stream,
                               field: nested(300)})
    _openai_400(r, field)
    _no_upstream_call(fresh)


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_deep_values_inside_echoed_objects(cgw, ckey, fresh, model):
    """A hosted tool or a text.format key the chat request does not carry still has to be written back."""
    from tests.providers.test_bad_fields import nested
    for extra in ({"tools": [{"type": "web_search", "filters": nested(300)}]},
                  {"tools": [{"type": "function", "name": "f", "x": nested(300)}]},
                  {"tool_choice": {"type": "function", "name": "f", "x": nested(300)}},
                  {"text": {"format": {"type": "text", "x": nested(300)}}}):
        for stream in (False, True):
            r = _responses(cgw, ckey, {"model": model, "input": "hi", "stream": stream, **extra})
            assert r.status_code == 400, (extra, r.text[:300])
            assert "nested" in r.json()["error"]["message"]
    _no_upstream_call(fresh)


@pytest.mark.parametrize("metadata,param", [
    ({f"k{i}": "v" for i in range(17)}, "metadata"),
    ({"k" * 65: "v"}, "metadata"),
    ({"k": "v" * 513}, "metadata.k"),
    ({"k": 5}, "metadata.k"),
    ({"k": {"a": "b"}}, "metadata.k"),
    (["k", "v"], "metadata"),
])
def test_metadata_as_openai_documents_it(cgw, ckey, fresh, metadata, param):
    for model in RESPONSES_MODELS:
        _openai_400(_responses(cgw, ckey, {"model": model, "input": "hi", "metadata": metadata}), param)
    _no_upstream_call(fresh)


@pytest.mark.parametrize("fields,param", [
    ({"user": 5}, "user"), ({"store": "yes"}, "store"), ({"parallel_tool_calls": 1}, "parallel_tool_calls"),
    ({"tools": {"type": "function"}}, "tools"), ({"tools": ["f"]}, "tools[0]"), ({"tool_choice": 5}, "tool_choice"),
    ({"max_output_tokens": "20"}, "max_output_tokens"), ({"max_output_tokens": True}, "max_output_tokens"),
    ({"temperature": "hot"}, "temperature"), ({"reasoning": {"effort": ["high"]}}, "reasoning.effort"),
    ({"text": {"format": "json"}}, "text.format"), ({"reasoning": "high"}, "reasoning"),
])
def test_wrong_types_are_openai_400s(cgw, ckey, fresh, fields, param):
    client = openai.OpenAI(api_key=ckey, base_url=cgw.url + "/v1", max_retries=0)
    for model in RESPONSES_MODELS:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=model, input="hi", **fields)
        assert e.value.body["param"] == param and e.value.body["code"] == "invalid_type", e.value.body
    _no_upstream_call(fresh)


def test_good_fields_are_echoed(cgw, ckey, fresh):
    client = openai.OpenAI(api_key=ckey, base_url=cgw.url + "/v1", max_retries=0)
    md = {f"k{i}": "v" * 512 for i in range(15)} | {"k" * 64: ""}
    for model in ("lbl/llama", "anthropic/claude-haiku"):
        r = client.responses.create(model=model, input="hi", metadata=md, user="u", store=False,
                                    parallel_tool_calls=False, tool_choice="auto", temperature=0.5, top_p=1,
                                    max_output_tokens=50, reasoning={"effort": "low", "summary": None},
                                    text={"format": {"type": "text"}},
                                    tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}},
                                           {"type": "web_search"}])
        assert r.metadata == md and r.user == "u" and r.store is False and r.parallel_tool_calls is False
        assert r.status == "completed"
