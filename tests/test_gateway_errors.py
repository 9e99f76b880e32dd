"""Every bad input gets a clear OpenAI-shaped error with the right status; no secret leaks."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY, provider_env, running_gateway
from tests.helpers.servers import free_port, gateway_proc, wait_http
from tests.mocks.openai_mock import Scripted

CHAT = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def post(gw, path="/v1/chat/completions", key=None, **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(gw.url + path, headers=headers, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]
    return err


def test_missing_and_bad_key(gateway):
    assert_error(post(gateway, json=CHAT), 401, "missing api key")
    assert_error(post(gateway, key="sk-not-a-real-key", json=CHAT), 401, "invalid api key")
    c = openai.OpenAI(api_key="sk-wrong", base_url=gateway.url, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(**CHAT)


def test_revoked_blocked_expired_keys(gateway, fresh_mock):
    k1 = gateway.new_key("rev@lbl.gov")
    assert post(gateway, key=k1, json=CHAT).status_code == 200
    assert gateway.admin("POST", "/key/delete", json={"keys": [k1]}).status_code == 200
    assert_error(post(gateway, key=k1, json=CHAT), 401, "revoked")

    k2 = gateway.new_key("blk@lbl.gov")
    gateway.admin("POST", "/key/block", json={"key": k2})
    assert_error(post(gateway, key=k2, json=CHAT), 401, "blocked")
    gateway.admin("POST", "/key/unblock", json={"key": k2})
    assert post(gateway, key=k2, json=CHAT).status_code == 200

    k3 = gateway.new_key("exp@lbl.gov", duration="1s")
    time.sleep(1.2)
    assert_error(post(gateway, key=k3, json=CHAT), 401, "expired")


def test_unknown_model_404_and_not_allowed_403(gateway, api_key):
    err = assert_error(post(gateway, key=api_key, json={**CHAT, "model": "openai/gpt-99"}), 404, "does not exist",
                       "/v1/models")
    assert err["code"] == "model_not_found" and err["param"] == "model"
    limited = gateway.new_key("lim@lbl.gov", models=["openai/gpt-4o-mini", "lbl/*"])
    assert_error(post(gateway, key=limited, json=CHAT), 403, "may not use", "openai/gpt-4o")
    assert post(gateway, key=limited, json={**CHAT, "model": "openai/gpt-4o-mini"}).status_code == 200
    assert post(gateway, key=limited, json={**CHAT, "model": "cborg-chat"}).status_code == 200  # lbl/* allows it
    c = openai.OpenAI(api_key=limited, base_url=gateway.url, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(**CHAT)
    assert "openai/gpt-4o" not in [m.id for m in c.models.list()]


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1,2]", None),
    (b"", None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "openai/gpt-4o"}', "messages"),
    (b'{"model": "openai/gpt-4o", "messages": []}', "messages"),
    (b'{"model": "openai/gpt-4o", "messages": ["hi"]}', "messages[0]"),
])
def test_malformed_requests_400(gateway, api_key, body, param):
    err = assert_error(post(gateway, key=api_key, content=body, headers={"content-type": "application/json"}), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_a_wrong_type_is_not_called_too_deep(gateway, api_key):
    # orjson's encode error is TypeError itself: every TypeError while translating was "nested too deeply"
    r = post(gateway, "/v1/messages", headers={"x-api-key": api_key},
             json={"model": "openai/gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                   "tools": 5})
    assert r.status_code == 400 and "nested" not in r.text and r.json()["type"] == "error", r.text


def test_missing_fields_other_endpoints(gateway, api_key):
    assert_error(post(gateway, "/completions", key=api_key, json={"model": "openai/gpt-4o"}), 400, "prompt")
    assert_error(post(gateway, "/embeddings", key=api_key, json={"model": "lbl/nomic-embed-text"}), 400, "input")


def test_body_over_limit_413(gateway, api_key):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}
    assert_error(post(gateway, key=api_key, json=big), 413, "limit")
    # also without a content-length (chunked upload)
    def gen():
        for _ in range(80):
            yield b"x" * 16384
    assert_error(post(gateway, key=api_key, content=gen()), 413)


def test_unknown_path_and_method(gateway, api_key):
    assert_error(httpx.get(gateway.url + "/v1/nothing"), 404)
    assert_error(httpx.get(gateway.url + "/v1/chat/completions"), 405)


def test_commercial_without_credentials_names_variable(gateway, api_key):
    # the session gateway has no Anthropic, Gemini or xAI-less env: Anthropic is unconfigured
    r = post(gateway, key=api_key, json={**CHAT, "model": "anthropic/claude-sonnet"})
    assert_error(r, 503, "ANTHROPIC_API_KEY")
    assert r.headers["x-should-retry"] == "false"
    c = openai.OpenAI(api_key=api_key, base_url=gateway.url)   # default retries: told not to retry
    t = time.time()
    with pytest.raises(openai.InternalServerError, match="GEMINI_API_KEY"):
        c.chat.completions.create(**{**CHAT, "model": "google/gemini-flash"})
    assert time.time() - t < 1.0


def test_upstream_unreachable_502_and_timeout_504(tmp_path, mock_openai):
    mock_openai.reset()
    dead = f"http://127.0.0.1:{free_port()}/v1"

    def edit(conf):
        conf["providers"]["openai"]["timeouts"] = {"connect": 2, "first_byte": 0.5, "read": 1, "total": 5}
        conf["providers"]["openai"]["retry"] = {"attempts": 0}
        conf["providers"]["xai"]["retry"] = {"attempts": 1, "backoff": 0.01}

    env = {**provider_env(mock_openai), "XAI_BASE_URL": dead}
    with running_gateway(tmp_path, mock_openai, edit=edit, env=env) as gw:
        key = gw.new_key()
        err = assert_error(post(gw, key=key, json={**CHAT, "model": "xai/grok"}), 502, "unreachable")
        assert err["code"] == "upstream_unreachable"
        mock_openai.script.append(Scripted(delay=2.0))
        t = time.time()
        err = assert_error(post(gw, key=key, json=CHAT), 504, "timed out")
        assert time.time() - t < 1.8
        assert err["code"] == "upstream_timeout"
    mock_openai.reset()


def test_upstream_error_status_and_message_pass_through(gateway, api_key, fresh_mock):
    fresh_mock.script.append(Scripted(400, {"error": {"message": "Invalid 'messages[0].content': too long.",
                                                      "type": "invalid_request_error", "param": None,
                                                      "code": None}}))
    err = assert_error(post(gateway, key=api_key, json=CHAT), 400, "too long", "openai")
    assert err["code"] == "upstream_error"
    # the upstream's own code and param reach the client (SDK users branch on them)
    fresh_mock.script.append(Scripted(400, {"error": {"message": "This model's maximum context length is 128000",
                                                      "type": "invalid_request_error", "param": "messages",
                                                      "code": "context_length_exceeded"}}))
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(api_key=api_key, base_url=gateway.url).chat.completions.create(**CHAT)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    # an upstream that quotes the gateway's provider key back (the real APIs mask it; some proxies don't)
    fresh_mock.script.append(Scripted(400, {"error": {"message": f"debug: key {fresh_mock.api_key} rejected"}}))
    r = post(gateway, key=api_key, json=CHAT)
    assert "debug: key *** rejected" in r.text and fresh_mock.api_key not in r.text
    # the provider refusing the gateway's own credentials is not the client's 401
    fresh_mock.script.append(Scripted(401, {"error": {"message": "Incorrect API key provided: sk-pr***",
                                                      "type": "invalid_request_error", "code": "invalid_api_key"}}))
    err = assert_error(post(gateway, key=api_key, json=CHAT), 502, "Your API key is fine")
    assert err["code"] == "upstream_auth_error"


def test_no_secret_in_logs_or_error_bodies(tmp_path, mock_openai):
    """A gateway process with a wrong provider key (the upstream echoes part of it) and bad client keys."""
    mock_openai.reset()
    port = free_port()
    from tests.conftest import write_catalog
    cfg = write_catalog(tmp_path / "models.yaml", mock_openai.url)
    provider_key = "sk-proj-WRONGPROVIDERKEY0123456789abcdef"
    env = {**provider_env(mock_openai), "OPENAI_API_KEY": provider_key, "CBORG_CONFIG": str(cfg),
           "CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}", "CBORG_MASTER_KEY": MASTER_KEY,
           "ANTHROPIC_API_KEY": "sk-ant-api03-SECRETANTHROPIC0123456789"}
    proc = gateway_proc(port, env, tmp_path / "gw.log")
    bodies = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health/liveliness", proc=proc.p)
        key = httpx.post(url + "/key/generate", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                         json={"user_id": "s@lbl.gov"}).json()["key"]
        for k in (key, "sk-client-typo-abcdef123456", None):
            h = {"Authorization": f"Bearer {k}"} if k else {}
            for body in (CHAT, {**CHAT, "model": "anthropic/claude-haiku"}, {"model": "x"}, {**CHAT, "stream": True}):
                r = httpx.post(url + "/v1/chat/completions", headers=h, json=body, timeout=30)
                bodies.append(r.text)
        auth = [json.loads(b)["error"] for b in bodies if "refused this gateway's credentials" in b]
        assert auth and all(e["code"] == "upstream_auth_error" for e in auth)   # not the client's 401
    finally:
        proc.stop()
    log = proc.output()
    everything = log + "\n".join(bodies)
    for secret in (provider_key, provider_key[:12], key, MASTER_KEY, "SECRETANTHROPIC", mock_openai.api_key):
        assert secret not in everything, secret
    assert "sk-client-typo" not in everything


def test_base_url_pointing_at_the_gateway_itself_is_a_508_not_a_loop(tmp_path, mock_openai):
    """OPENAI_BASE_URL left pointing at this gateway (a shell where the SDK was aimed at it)."""
    from tests.conftest import write_catalog
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**provider_env(mock_openai), "OPENAI_BASE_URL": url + "/v1", "OPENAI_API_KEY": "sk-some-cborg-key-123",
           "CBORG_CONFIG": str(write_catalog(tmp_path / "models.yaml", mock_openai.url)),
           "CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}", "CBORG_MASTER_KEY": MASTER_KEY}
    proc = gateway_proc(port, env, tmp_path / "gw.log")
    try:
        wait_http(url + "/health/liveliness", proc=proc.p)
        key = httpx.post(url + "/key/generate", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                         json={"user_id": "loop@lbl.gov"}).json()["key"]
        t = time.time()
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=CHAT, timeout=10)
        assert r.status_code == 508 and "points at this gateway" in r.json()["error"]["message"], r.text
        assert r.headers["x-should-retry"] == "false" and time.time() - t < 2
        # the xAI provider still goes where it should
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={**CHAT, "model": "xai/grok"}, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        proc.stop()
    assert proc.output().count('"status":508') == 1     # the one request, answered once: no loop
