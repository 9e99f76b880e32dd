"""Retries, in-stream failures, fallbacks, client disconnects and errors, for every upstream protocol."""
from __future__ import annotations

import json
import logging
import time

import httpx
import openai
import pytest

from tests.conftest import running_gateway
from tests.mocks.openai_mock import Scripted
from tests.providers.conftest import fast_retries

# One model per upstream protocol.
BY_PROTOCOL = {"openai": "openai/gpt-4o", "anthropic": "anthropic/claude-sonnet", "gemini": "google/gemini-flash",
               "bedrock": "aws/command-r-v1"}
PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "google", "bedrock": "aws"}
RATE_LIMITED = {
    "openai": (429, {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests", "param": None,
                               "code": "rate_limit_exceeded"}}),
    "anthropic": (429, {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens "
                                                   "has exceeded your per-minute rate limit"}}),
    "gemini": (429, {"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                               "status": "RESOURCE_EXHAUSTED"}}),
    "bedrock": (429, {"message": "Too many requests, please wait before trying again."}),
}
PROTOCOLS = list(BY_PROTOCOL)


@pytest.fixture
def client(cgw, ckey, fresh):
    return openai.OpenAI(api_key=ckey, base_url=cgw.url, max_retries=0)


def mock_for(mocks, protocol: str):
    return mocks.by_provider(PROVIDER[protocol])


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True])
def test_429_then_200_is_retried(client, fresh, protocol, stream):
    mock = mock_for(fresh, protocol)
    status, body = RATE_LIMITED[protocol]
    mock.script.append(Scripted(status, body, headers={"retry-after": "0"}))
    msgs = [{"role": "user", "content": "retry me"}]
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=BY_PROTOCOL[protocol], messages=msgs, stream=True) if c.choices)
    else:
        text = client.chat.completions.create(model=BY_PROTOCOL[protocol], messages=msgs).choices[0].message.content
    assert text == "echo: retry me"
    assert len(mock.requests) == 2


def test_retry_honours_retry_after(client, fresh):
    fresh.anthropic.script.append(Scripted(529, {"type": "error", "error": {"type": "overloaded_error",
                                                                            "message": "Overloaded"}},
                                           headers={"retry-after": "0.15"}))   # under the 4 x max_backoff cap
    t = time.time()
    client.chat.completions.create(model="anthropic/claude-haiku", messages=[{"role": "user", "content": "x"}])
    assert time.time() - t >= 0.15
    assert len(fresh.anthropic.requests) == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_upstream_error_is_openai_shaped(client, fresh, protocol):
    mock = mock_for(fresh, protocol)
    status, body = RATE_LIMITED[protocol]
    for _ in range(3):
        mock.script.append(Scripted(status, body, headers={"retry-after": "0"}))
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=BY_PROTOCOL[protocol], messages=[{"role": "user", "content": "x"}])
    err = e.value.body
    assert set(err) >= {"message", "type", "param", "code"}
    assert "429" in err["message"] and BY_PROTOCOL[protocol] in err["message"]
    upstream_msg = body["error"]["message"] if "error" in body else body["message"]
    assert upstream_msg in err["message"]
    assert len(mock.requests) == 3      # the first try and the catalog's 2 retries


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("how", ["error_event", "connection_cut"])
def test_failure_after_first_streamed_byte_is_reported_in_stream_not_retried(client, fresh, protocol, how):
    mock = mock_for(fresh, protocol)
    mock.script.append(Scripted(error_after=3) if how == "error_event" else Scripted(cut_after=3))
    got = []
    with pytest.raises(openai.APIError) as e:
        for c in client.chat.completions.create(model=BY_PROTOCOL[protocol], stream=True,
                                                messages=[{"role": "user", "content": "a b c d e f g h"}]):
            got.append(c)
    assert got, "some chunks arrived before the failure"
    assert len(mock.requests) == 1     # never retried once bytes reached the client
    assert "failed" in str(e.value).lower() or "error" in str(e.value).lower()


def test_in_stream_error_event_is_openai_shaped(cgw, ckey, fresh):
    fresh.anthropic.script.append(Scripted(error_after=4))
    with httpx.stream("POST", cgw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ckey}"},
                      json={"model": "anthropic/claude-sonnet", "stream": True,
                            "messages": [{"role": "user", "content": "a b c d e f"}]}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert len(errors) == 1
    assert set(errors[0]) == {"message", "type", "param", "code"}
    assert "Overloaded" in errors[0]["message"]
    assert events[-1] == "[DONE]"


def test_garbage_inside_a_stream_is_reported_in_stream(client, fresh):
    start = {"type": "message_start", "message": {"id": "msg_x", "type": "message", "role": "assistant",
             "model": "claude-sonnet-4-5", "content": [], "usage": {"input_tokens": 5, "output_tokens": 1}}}
    fresh.anthropic.script.append(Scripted(200, ("event: message_start\ndata: " + json.dumps(start) + "\n\n"
                                                 "event: content_block_delta\ndata: {oops\n\n").encode(),
                                           headers={"Content-Type": "text/event-stream"}))
    with pytest.raises(openai.APIError, match="could not be read"):
        list(client.chat.completions.create(model="anthropic/claude-sonnet", stream=True,
                                            messages=[{"role": "user", "content": "x"}]))
    assert len(fresh.anthropic.requests) == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_disconnect_cancels_upstream_and_accounts_partial_usage(cgw, ckey, fresh, monkeypatch, protocol):
    finished = []
    orig = cgw.gw.accountant.finish

    def spy(call):   # works whether finish is a function or a coroutine function
        finished.append(call)
        return orig(call)
    monkeypatch.setattr(cgw.gw.accountant, "finish", spy)
    mock = mock_for(fresh, protocol)
    mock.chunk_delay = 0.3
    words = " ".join(f"w{i}" for i in range(40))      # about 12 s of stream if read to the end
    c = openai.OpenAI(api_key=ckey, base_url=cgw.url, max_retries=0)
    s = c.chat.completions.create(model=BY_PROTOCOL[protocol], stream=True,
                                  messages=[{"role": "user", "content": words}])
    n = 0
    for chunk in s:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
            if n == 2:
                break
    t = time.time()
    s.close()
    deadline = t + 3
    while time.time() < deadline and not (mock.cancelled_streams and finished):
        time.sleep(0.02)
    assert mock.cancelled_streams == 1, "the upstream request was not cancelled"
    assert time.time() - t < 1.5
    assert mock.active_streams == 0
    call = finished[-1]
    assert call.usage is not None and call.usage["prompt_tokens"] > 0
    assert call.usage["completion_tokens"] >= 2
    assert call.cost > 0


def _with_fallback(conf):
    fast_retries(conf)
    conf["models"].append({"name": "aws/claude-sonnet", "provider": "aws",
                           "model": "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "supports_vision": True,
                           "supports_function_calling": True, "supports_prompt_caching": True,
                           "max_output_tokens": 64000,
                           "price": {"input": 3.0, "cached_input": 0.3, "cache_write": 3.75, "output": 15.0}})
    for m in conf["models"]:
        if m["name"] == "anthropic/claude-sonnet":
            m["fallbacks"] = ["aws/claude-sonnet"]


@pytest.fixture(scope="module")
def fallback_gw(mocks, tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("fb"), mocks.openai, edit=_with_fallback, env=mocks.env()) as g:
        yield g, g.new_key()


def test_fallback_when_provider_fails(fallback_gw, fresh):
    gw, key = fallback_gw
    for _ in range(3):
        fresh.anthropic.script.append(Scripted(529, {"type": "error", "error": {"type": "overloaded_error",
                                                                                "message": "Overloaded"}}))
    c = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="anthropic/claude-sonnet",
                                                      messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-cborg-served-by"] == "aws/claude-sonnet"
    r = raw.parse()
    assert r.choices[0].message.content == "echo: hello"
    assert r.model == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert len(fresh.anthropic.requests) == 3 and len(fresh.bedrock.requests) == 1
    # a stream falls back the same way (nothing was sent to the client yet)
    for _ in range(3):
        fresh.anthropic.script.append(Scripted(500, {"type": "error", "error": {"type": "api_error",
                                                                                "message": "Internal server error"}}))
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="anthropic/claude-sonnet", stream=True, messages=[{"role": "user", "content": "again"}]) if ch.choices)
    assert text == "echo: again"


def test_no_fallback_to_a_model_the_key_may_not_use(fallback_gw, fresh):
    gw, _ = fallback_gw
    key = gw.new_key(models=["anthropic/*"])        # may not use aws/claude-sonnet, the fallback
    for _ in range(3):
        fresh.anthropic.script.append(Scripted(529, {"type": "error", "error": {"type": "overloaded_error",
                                                                                "message": "Overloaded"}}))
    c = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="anthropic/claude-sonnet", messages=[{"role": "user", "content": "hello"}])
    assert e.value.status_code == 529 and len(fresh.bedrock.requests) == 0


def test_no_fallback_on_client_error(fallback_gw, fresh):
    gw, key = fallback_gw
    c = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature: range"):
        c.chat.completions.create(model="anthropic/claude-sonnet", temperature=1.7,
                                  messages=[{"role": "user", "content": "x"}])
    assert len(fresh.bedrock.requests) == 0


def test_bedrock_prompt_caching_with_cache_points(fallback_gw, fresh):
    gw, key = fallback_gw
    c = openai.OpenAI(api_key=key, base_url=gw.url, max_retries=0)
    got = []
    for _ in range(2):
        r = c.chat.completions.with_raw_response.create(model="aws/claude-sonnet", messages=[
            {"role": "system", "content": "Always talk like a pirate. " * 200, "cache_control": {"type": "ephemeral"}},
            {"role": "user", "content": "What letter comes after A in the alphabet?"}])
        got.append(json.loads(r.content)["usage"])
    assert fresh.bedrock.requests[-1]["json"]["system"][-1] == {"cachePoint": {"type": "default"}}
    assert got[0]["cache_creation_input_tokens"] > 1000 and got[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert got[1]["prompt_tokens_details"]["cached_tokens"] == got[0]["cache_creation_input_tokens"]
    assert got[0]["prompt_tokens"] == got[1]["prompt_tokens"]


def test_fallback_when_provider_has_no_credentials(mocks, tmp_path, fresh):
    env = {k: v for k, v in mocks.env().items() if k != "ANTHROPIC_API_KEY"}
    with running_gateway(tmp_path, mocks.openai, edit=_with_fallback, env=env) as gw:
        c = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url, max_retries=0)
        raw = c.chat.completions.with_raw_response.create(model="anthropic/claude-sonnet",
                                                          messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-cborg-served-by"] == "aws/claude-sonnet"
        with pytest.raises(openai.InternalServerError, match="ANTHROPIC_API_KEY"):
            c.chat.completions.create(model="anthropic/claude-haiku", messages=[{"role": "user", "content": "hi"}])
    assert not fresh.anthropic.requests


def test_missing_aws_credentials_names_what_to_set(mocks, tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env = {k: v for k, v in mocks.env().items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    with running_gateway(tmp_path, mocks.openai, env=env) as gw:
        c = openai.OpenAI(api_key=gw.new_key(), base_url=gw.url, max_retries=0)
        for _ in range(2):   # the second answer comes from the remembered miss
            with pytest.raises(openai.InternalServerError) as e:
                c.chat.completions.create(model="aws/llama-3.1-8b", messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 503
            assert "AWS_ACCESS_KEY_ID" in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)


@pytest.mark.parametrize("name,bad,param,words", [
    ("anthropic/claude-sonnet", {"n": 2}, "n", "one choice"),
    ("aws/llama-3.1-8b", {"n": 3}, "n", "one choice"),
    ("anthropic/claude-sonnet", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]}, "messages[0].content[0]", "http(s) or data"),
    ("google/gemini-pro", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}]}]}, "messages[0].content[0]",
     "data: URL"),
    ("anthropic/claude-haiku", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0]", "not valid JSON"),
    ("google/gemini-flash", {"messages": [{"role": "user", "content": "x"},
                                          {"role": "tool", "tool_call_id": "nope", "content": "r"}]},
     "messages[1].tool_call_id", "does not match"),
    ("aws/command-r-v1", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes",
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, None, None),
    ("anthropic/claude-sonnet", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "not supported"),
    ("anthropic/claude-sonnet", {"response_format": {"type": "json_object"},    # a forced tool beside the caller's
                                 "tools": [{"type": "function", "function": {"name": "f"}}]},
     "response_format", "cannot be combined"),
    ("anthropic/claude-opus", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "string"}}}}}, "response_format", '"type": "object"'),
    ("anthropic/claude-haiku", {"response_format": {"type": "json_object"}, "reasoning_effort": "low"},
     "response_format", "extended thinking"),
    ("anthropic/claude-sonnet", {"tools": [{"type": "function", "function": {"name": "json_tool_call"}}]},
     "tools[0]", "reserved"),
    ("aws/command-r-plus-v1", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format", "not supported"),
    ("google/gemini-flash", {"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages",
     "at least one user message"),
])
def test_bad_input_gives_openai_shaped_400(cgw, ckey, fresh, name, bad, param, words):
    body = {"model": name, "messages": [{"role": "user", "content": "x"}], **bad}
    r = httpx.post(cgw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ckey}"}, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    if words:
        assert words in err["message"]
    assert not any(m.requests for m in (fresh.anthropic, fresh.gemini, fresh.bedrock))


@pytest.mark.parametrize("provider,model,status", [("anthropic", "anthropic/claude-sonnet", 502),   # 401 upstream
                                                   ("google", "google/gemini-flash", 400),   # Gemini says 400
                                                   ("aws", "aws/llama-3.1-70b", 502)])       # 403 upstream
def test_provider_keys_never_in_errors_or_logs(mocks, tmp_path, caplog, provider, model, status):
    """A gateway with wrong provider credentials, and an upstream that echoes the key it was sent."""
    env = {**mocks.env(), "ANTHROPIC_API_KEY": "sk-ant-api03-WRONGKEY-abcdefghijklmnop",
           "GEMINI_API_KEY": "AIzaWRONGKEYabcdefghijklmnopqrstuvwx", "AWS_SECRET_ACCESS_KEY": "wrong/SECRET+abcdefghijkl"}
    secrets = ("sk-ant-api03-WRONGKEY", "AIzaWRONGKEY", "wrong/SECRET", mocks.anthropic.api_key, mocks.gemini.api_key,
               mocks.bedrock.secret_key)
    caplog.set_level(logging.DEBUG)
    with running_gateway(tmp_path, mocks.openai, env=env) as gw:
        key = gw.new_key()
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        if status == 502:    # the gateway's credentials refused: not the client's key at fault
            assert r.json()["error"]["code"] == "upstream_auth_error"
        bodies = [r.text]
        # an upstream that quotes the key back in its error message
        mock = mocks.by_provider(provider)
        mock.script.append(Scripted(400, {"type": "error", "error": {"type": "invalid_request_error",
                                          "message": f"bad key {env['ANTHROPIC_API_KEY']} / {env['GEMINI_API_KEY']}"}}))
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True})
        bodies.append(r.text)
        mock.reset()
    everything = "\n".join(bodies) + caplog.text
    for s in secrets:
        assert s not in everything, s
