"""A client's malformed fields are a 400 in the API's own error shape, never a 500 (issue 14 item 6):
`"stop": 5` on the Anthropic, Google and AWS models, JSON nested 255-1,024 levels (orjson reads 1,024
levels but writes 254), `"stream": "yes"`."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.providers.conftest import commercial_models

MODELS = {}
for _m in commercial_models():
    MODELS.setdefault(_m["provider"], _m["name"])
CHAT_MODELS = [MODELS[p] for p in ("openai", "anthropic", "google", "aws")]
MSG = [{"role": "user", "content": "hello"}]


class nested:
    """An array nested `depth` levels, written by hand (Python's json stops at about 1,000)."""

    def __init__(self, depth: int):
        self.depth = depth


def dumps(v) -> str:
    if isinstance(v, nested):
        return "[" * v.depth + "1" + "]" * v.depth
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


def post(cgw, key, path, body, anthropic=False):
    h = {"x-api-key": key, "anthropic-version": "2023-06-01"} if anthropic else {"Authorization": f"Bearer {key}"}
    return httpx.post(cgw.url + path, content=dumps(body), headers={**h, "content-type": "application/json"},
                      timeout=30)


def openai_400(r, *words):
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and all(w in err["message"] for w in words), err
    assert "Traceback" not in r.text


@pytest.mark.parametrize("model", CHAT_MODELS)
@pytest.mark.parametrize("stop", [5, [1, 2], {"a": 1}, True, ["ok", None]])
def test_stop_of_the_wrong_type(cgw, ckey, fresh, model, stop):
    openai_400(post(cgw, ckey, "/v1/chat/completions", {"model": model, "messages": MSG, "stop": stop}), "stop")


@pytest.mark.parametrize("model", CHAT_MODELS)
@pytest.mark.parametrize("stream", ["yes", 1, "true", [], {}])
def test_stream_not_a_boolean(cgw, ckey, fresh, model, stream):
    openai_400(post(cgw, ckey, "/v1/chat/completions", {"model": model, "messages": MSG, "stream": stream}),
               "stream")


@pytest.mark.parametrize("model", CHAT_MODELS)
@pytest.mark.parametrize("depth", [255, 600, 1000])
def test_deeply_nested_json(cgw, ckey, fresh, model, depth):
    """Where the deep value is relayed, a 400 saying so (a tool's schema); a field a provider's
    translation drops (metadata) may pass, a deep value where an object belongs is a 400 that says
    that. Never a 5xx."""
    for body in ({"model": model, "messages": MSG, "metadata": nested(depth)},
                 {"model": model, "messages": [{"role": "user", "content": nested(depth)}]},
                 {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": nested(depth)}]}]},
                 {"model": model, "messages": MSG, "tools": [{"type": "function", "function": {
                     "name": "f", "parameters": {"type": "object", "properties": {"x": {"default": nested(depth)}}}}}]}):
        r = post(cgw, ckey, "/v1/chat/completions", body)
        assert r.status_code in (200, 400), r.text[:300]
        assert r.status_code == 200 or r.json()["error"]["type"] == "invalid_request_error"
    r = post(cgw, ckey, "/v1/chat/completions", {"model": model, "messages": MSG, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"default": nested(depth)}}}}}]})
    openai_400(r, "nested")


def test_messages_api_answers_in_its_own_shape(cgw, ckey, fresh):
    model = MODELS["anthropic"]
    for body, word in (({"stream": "yes"}, "stream"), ({"stop_sequences": 5}, "stop_sequences"),
                       ({"metadata": {"user_id": nested(600)}}, "nested"), ({"metadata": nested(600)}, "metadata")):
        r = post(cgw, ckey, "/v1/messages", {"model": model, "max_tokens": 10, "messages": MSG, **body}, anthropic=True)
        assert r.status_code == 400, r.text[:300]
        j = r.json()
        assert j["type"] == "error" and j["error"]["type"] == "invalid_request_error" and word in j["error"]["message"]


def test_responses_api(cgw, ckey, fresh):
    deep_tool = [{"type": "function", "name": "f", "parameters": {"type": "object", "default": nested(600)}}]
    for body, word in (({"stream": "yes"}, "stream"), ({"tools": deep_tool}, "nested"),
                       ({"metadata": nested(600)}, "metadata")):
        openai_400(post(cgw, ckey, "/v1/responses", {"model": MODELS["openai"], "input": "hi", **body}), word)


def test_a_good_request_still_passes(cgw, ckey, fresh):
    for model in CHAT_MODELS:
        r = post(cgw, ckey, "/v1/chat/completions", {"model": model, "messages": MSG, "stop": ["x"], "stream": False,
                                                     "metadata": nested(20)})
        assert r.status_code == 200, (model, r.text[:300])
