"""Bad admin input (HTTP and CLI alike): a 400 naming the field, nothing stored, and nothing that
breaks the gateway for everyone afterwards (a stored -5 s budget period once made every request of
that key, and /key/list, answer 500)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MASTER_KEY, running_gateway
from tests.helpers.servers import ROOT
from tests.helpers import hostile

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

# The reproductions: each was stored or crashed before.
KNOWN_BAD = [
    ("/key/generate", {"user_id": "u@lbl.gov", "budget_duration": -5}, "budget_duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "budget_duration": "0s"}, "budget_duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "budget_duration": 1e308}, "budget_duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "budget_duration": "99999999y"}, "budget_duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "duration": "99999999y"}, "duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "duration": -100}, "duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "rpm_limit": 2 ** 63}, "rpm_limit"),
    ("/key/generate", {"user_id": "u@lbl.gov", "tpm_limit": 2 ** 64}, "tpm_limit"),
    ("/key/generate", {"user_id": "u@lbl.gov", "key_alias": {"a": 1}}, "key_alias"),
    ("/key/generate", {"user_id": "nul\x00@lbl.gov"}, "user_id"),
    ("/key/generate", {"user_id": "u@lbl.gov", "max_budget": "nan"}, "max_budget"),
    ("/key/generate", {"user_id": "u@lbl.gov", "max_budget": "inf"}, "max_budget"),
    ("/key/generate", {"user_id": "u@lbl.gov", "max_budget": -1}, "max_budget"),
    ("/key/generate", {"user_id": "u@lbl.gov", "metadata": {"x": "a\x00b"}}, "metadata"),
    ("/key/generate", {"user_id": "u@lbl.gov", "models": [1, 2]}, "models[0]"),
    ("/user/update", {"user_id": "u@lbl.gov", "budget_duration": "0s"}, "budget_duration"),
    ("/user/update", {"user_id": "u@lbl.gov", "max_parallel_requests": 2 ** 63}, "max_parallel_requests"),
    ("/cost/calculate", {"model": "openai/gpt-4o", "prompt_tokens": 1e300}, "prompt_tokens"),
    # true was taken as 1 (second), "" as no expiry; an alias like a key id took that key's place
    ("/key/generate", {"user_id": "u@lbl.gov", "duration": True}, "duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "budget_duration": True}, "budget_duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "duration": ""}, "duration"),
    ("/user/update", {"user_id": "u@lbl.gov", "budget_duration": False}, "budget_duration"),
    ("/key/generate", {"user_id": "u@lbl.gov", "key_alias": "key-0123456789ab"}, "key_alias"),
    ("/cost/calculate", {"model": "openai/gpt-4o", "completion_response": {"usage": {"prompt_tokens": -5}}},
     "completion_response.usage.prompt_tokens"),
]


def admin(gw, path: str, body) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + path, content=raw, timeout=30,
                      headers={"Authorization": f"Bearer {MASTER_KEY}", "content-type": "application/json"})


def counts(gw) -> tuple[int, int]:
    keys = gw.run(gw.gw.store.list_keys())
    users = {k.user_id for k in keys} | set(gw.gw.keys.users)
    return len(keys), len(users)


def still_healthy(gw, key: str) -> None:
    r = httpx.get(gw.url + "/key/list?size=5", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert r.status_code == 200, r.text
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=CHAT)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock_openai):
    with running_gateway(tmp_path_factory.mktemp("admin-input"), mock_openai) as g:
        g.key = g.new_key("admin-input@lbl.gov")
        yield g


@pytest.mark.parametrize("path,body,field", KNOWN_BAD, ids=[f"{p}:{f}" for p, _, f in KNOWN_BAD])
def test_known_bad_admin_input_is_refused_and_nothing_stored(gw, path, body, field):
    before = counts(gw)
    r = admin(gw, path, body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == field and err["message"].startswith(field), r.text
    assert counts(gw) == before
    still_healthy(gw, gw.key)


def test_bad_admin_input_on_postgresql(tmp_path, mock_openai, pg_url):
    with running_gateway(tmp_path, mock_openai, db=pg_url) as g:
        key = g.new_key("pg@lbl.gov")
        for path, body, field in KNOWN_BAD[:16]:
            r = admin(g, path, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
        assert len(g.run(g.gw.store.list_keys())) == 1
        still_healthy(g, key)


json_values = hostile.json_values(["30d", "0s", "-1", "never", "", "1e308", "nan", "99999999y", "\x00", "true"],
                                  nonfinite=True, text_size=20, key_size=5, max_leaves=8)
FIELDS = ["user_id", "user", "key", "keys", "key_alias", "alias", "models", "duration", "expires", "metadata",
          "blocked", "max_budget", "budget", "budget_duration", "budget_period", "max_parallel_requests",
          "rpm_limit", "tpm_limit", "rpm", "tpm", "model", "prompt_tokens", "completion_tokens", "messages",
          "completion_response", "name", "node", "to"]
PATHS = ["/key/generate", "/key/update", "/key/block", "/key/delete", "/user/update", "/cost/calculate",
         "/admin/models/load", "/admin/models/swap"]


@given(path=st.sampled_from(PATHS), body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
       | json_values)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_arbitrary_json_in_every_admin_field_is_never_a_server_error(gw, path, body):
    before = counts(gw)
    r = admin(gw, path, json.dumps(body, allow_nan=True).encode())
    assert r.status_code < 500, (path, body, r.text)
    assert set(r.json()) <= {"error"} or r.status_code < 300, r.text
    if r.status_code >= 400 and path in ("/key/generate", "/user/update"):
        assert counts(gw) == before, (path, body)


def test_a_json_body_sent_as_a_form_is_told_so(gw):
    # curl -d '{...}' without -H: the body arrives as application/x-www-form-urlencoded
    r = httpx.post(gw.url + "/key/generate", content=b'{"user_id": "f@lbl.gov"}',
                   headers={"Authorization": f"Bearer {MASTER_KEY}",
                            "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text


def test_nesting_deeper_than_the_parsers_allow(gw):
    for depth in (255, 1024, 100_000):
        body = b'{"user_id": "d@lbl.gov", "metadata": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
        r = admin(gw, "/key/generate", body)
        assert r.status_code in (400, 413), (depth, r.text)
    still_healthy(gw, gw.key)


def cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cborg.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_the_cli_refuses_what_the_api_refuses(tmp_path):
    env = {**os.environ, "CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}"}
    for args, field in ((["--budget-period", "0s"], "budget_period"), (["--expires", "99999999y"], "expires"),
                        (["--budget", "nan"], "budget"), (["--rpm", str(2 ** 63)], "rpm")):
        r = cli("keys", "create", "--user", "c@lbl.gov", *args, env=env)
        assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = cli("users", "update", "nul\x01@lbl.gov", "--budget", "5", env=env)
    assert r.returncode == 2 and "user_id" in r.stderr, r.stderr
    assert cli("keys", "list", env=env).stdout == ""
