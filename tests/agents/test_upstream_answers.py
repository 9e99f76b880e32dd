"""An upstream's odd answers through all three inbound APIs (chat completions, Messages, Responses),
translated from an OpenAI-compatible upstream (the scripted OpenAI mock behind openai/* and lbl/*):

- its usage, however malformed (a list, a string count, negative, huge), never breaks a response or a
  stream, and the client is told the numbers that are billed (the ledger row);
- a whole JSON answer to a stream request is a clear error event saying so, never an empty success or
  raw JSON passed off as events."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mocks.openai_mock import Scripted

PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/responses"]
TERMINAL = {"/v1/chat/completions": "[DONE]", "/v1/messages": '"message_stop"', "/v1/responses": '"response.completed"'}


def _body(path: str, model: str, stream: bool) -> dict:
    if path == "/v1/messages":
        return {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi there"}], "stream": stream}
    if path == "/v1/responses":
        return {"model": model, "input": "hi there", "stream": stream, "store": False}
    b = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def _call(cgw, key, path, model, stream) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
    return httpx.post(cgw.url + path, json=_body(path, model, stream), headers=h, timeout=30)


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def _told(path: str, r: httpx.Response, stream: bool) -> tuple[int, int] | None:
    """(prompt, completion) tokens as the client is told them, in the OpenAI sense."""
    if not stream:
        u = r.json()["usage"]
    elif path == "/v1/chat/completions":
        u = next((e["usage"] for e in reversed(_events(r.text)) if e.get("usage")), None)
    elif path == "/v1/messages":
        u = [e for e in _events(r.text) if e["type"] == "message_delta"][-1]["usage"]
    else:
        u = [e for e in _events(r.text) if e["type"] == "response.completed"][-1]["response"]["usage"]
    if u is None:
        return None
    if path == "/v1/chat/completions":
        return u["prompt_tokens"], u["completion_tokens"]
    if path == "/v1/messages":
        if "input_tokens" not in u:        # (a stream whose upstream gave no usage)
            return None
        return (u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"],
                u["output_tokens"])
    return u["input_tokens"], u["output_tokens"]


def _row(cgw, r: httpx.Response) -> dict:
    cgw.run(cgw.gw.ledger.flush())
    rid = r.headers["x-request-id"]
    return next(x for x in cgw.run(cgw.gw.store.ledger_rows()) if x["request_id"] == rid)


def _check(cgw, fresh, key, usage, path, model, stream) -> None:
    fresh.openai.script[:] = [Scripted(usage=usage)]
    r = _call(cgw, key, path, model, stream)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    if stream:
        assert TERMINAL[path] in r.text, r.text[-300:]
        assert not [e for e in _events(r.text) if "error" in e and e["error"] or e.get("type") in (
            "error", "response.failed")], r.text[-300:]
    told = _told(path, r, stream)
    row = _row(cgw, r)
    assert row["status"] == 200 and 0 <= row["prompt_tokens"] and 0 <= row["completion_tokens"]
    if told is not None:
        assert told == (row["prompt_tokens"], row["completion_tokens"]), (told, row)
    else:     # no usable usage: what was delivered is counted
        assert stream and row["estimated"] and row["completion_tokens"] > 0, row


BAD_USAGE = [
    [1, 2],
    "lots",
    {"prompt_tokens": "5", "completion_tokens": 1},
    {"prompt_tokens": -5, "completion_tokens": -1_000_000_000, "total_tokens": -1},
    {"prompt_tokens": 10 ** 30, "completion_tokens": 1e308, "total_tokens": 1},
    {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": [1], "completion_tokens_details": "x"},
    {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 99}},
]


@pytest.mark.parametrize("usage", BAD_USAGE, ids=[json.dumps(u)[:40] for u in BAD_USAGE])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_usage_is_cleaned_and_the_client_told_what_is_billed(cgw, ckey, fresh, usage, path, stream):
    _check(cgw, fresh, ckey, usage, path, "lbl/llama", stream)


COUNT = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=False), st.text(max_size=3), st.none(),
                  st.booleans(), st.lists(st.integers(), max_size=2))
USAGE = st.one_of(st.fixed_dictionaries({}, optional={
    "prompt_tokens": COUNT, "completion_tokens": COUNT, "total_tokens": COUNT,
    "prompt_tokens_details": st.one_of(COUNT, st.fixed_dictionaries({}, optional={"cached_tokens": COUNT})),
    "completion_tokens_details": st.one_of(COUNT, st.fixed_dictionaries({}, optional={"reasoning_tokens": COUNT}))}),
    COUNT)


@given(usage=USAGE, path=st.sampled_from(PATHS), stream=st.booleans(),
       model=st.sampled_from(["lbl/llama", "openai/gpt-4o-mini"]))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
def test_any_usage_never_breaks_an_answer(cgw, ckey, mocks, usage, path, stream, model):
    if model == "openai/gpt-4o-mini" and path == "/v1/responses":
        return     # (passed through to OpenAI as it is: the mock's Responses API reports its own usage)
    _check(cgw, mocks, ckey, usage, path, model, stream)


WHOLE = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "THE ANSWER"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


@pytest.mark.parametrize("model", ["lbl/llama", "openai/gpt-4o-mini"])
@pytest.mark.parametrize("path", PATHS)
def test_a_whole_json_answer_to_a_stream_request_is_an_error_event(cgw, ckey, fresh, path, model):
    """Before: an empty successful stream (the answer lost), or for openai/* on /v1/responses the JSON
    relayed as if it were events."""
    fresh.openai.script[:] = [Scripted(status=200, body=WHOLE)]
    r = _call(cgw, ckey, path, model, True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events, r.text
    last = events[-1]
    if path == "/v1/chat/completions":
        msg = last["error"]["message"]
    elif path == "/v1/messages":
        assert last["type"] == "error" and last["error"]["type"] == "api_error"
        msg = last["error"]["message"]
    else:
        assert last["type"] == "response.failed"
        msg = last["response"]["error"]["message"]
    assert "not an event stream" in msg and "application/json" in msg, msg
    assert TERMINAL[path] not in r.text
    row = _row(cgw, r)
    assert row["status"] == 502 and row["cost"] == 0
