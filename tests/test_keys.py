"""API keys: the CLI, the admin API, storage as hashes, and revocation across replicas."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import MASTER_KEY, admin_new_key, gateway_replicas, running_gateway
from tests.helpers.servers import ROOT, free_port

CHAT = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cborg.cli", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_keys_lifecycle(tmp_path, mock_openai):
    import os
    db_file = tmp_path / "keys.db"
    env = {**os.environ, "CBORG_DATABASE_URL": f"sqlite:///{db_file}"}
    r = cli("keys", "create", "--user", "ada@lbl.gov", "--alias", "nb", "--models", "openai/gpt-4o,lbl/llama",
            "--expires", "30d", env=env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("sk-") and len(key) >= 3 + 43       # 256 random bits, URL-safe
    assert "shown only now" in r.stderr
    # stored only as a SHA-256 hash
    rows = sqlite3.connect(db_file).execute("SELECT * FROM keys").fetchall()
    assert key not in repr(rows)
    assert hashlib.sha256(key.encode()).hexdigest() in repr(rows)

    out = cli("keys", "list", env=env).stdout
    assert "ada@lbl.gov" in out and "nb" in out and key not in out and "active" in out
    info = json.loads(cli("keys", "info", key, env=env).stdout)
    assert info["models"] == ["openai/gpt-4o", "lbl/llama"] and "key_hash" not in info
    assert 29 * 86400 < info["expires_at"] - time.time() <= 30 * 86400
    assert json.loads(cli("keys", "info", info["id"], env=env).stdout)["id"] == info["id"]
    assert json.loads(cli("keys", "info", "nb", env=env).stdout)["id"] == info["id"]

    upd = cli("keys", "update", info["id"], "--rpm", "10", "--models", "openai/gpt-4o-mini", env=env)
    assert upd.returncode == 0 and json.loads(upd.stdout)["rpm"] == 10

    # the key works on a gateway using this database, until revoked
    with running_gateway(tmp_path / "g", mock_openai, db=f"sqlite:///{db_file}") as gw:
        assert httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={**CHAT, "model": "openai/gpt-4o-mini"}).status_code == 200
        rv = cli("keys", "revoke", key, env=env)
        assert rv.returncode == 0 and "revoked" in rv.stdout
        deadline = time.time() + 5
        while time.time() < deadline:
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={**CHAT, "model": "openai/gpt-4o-mini"})
            if r.status_code == 401:
                break
            time.sleep(0.2)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert "revoked" in cli("keys", "list", env=env).stdout


def test_cli_bad_input(tmp_path):
    import os
    env = {**os.environ, "CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}"}
    r = cli("keys", "create", "--user", "x@lbl.gov", "--expires", "soon", env=env)
    assert r.returncode == 2 and "not a duration" in r.stderr
    r = cli("keys", "info", "key-nope", env=env)
    assert r.returncode == 1 and "no key" in r.stderr
    r = cli("keys", "create", "--user", "x@lbl.gov", "--models", "openai/gpt-4o,gtp-4o-mini", env=env)
    assert r.returncode == 2 and "unknown model 'gtp-4o-mini'" in r.stderr    # a typo, not a key refused everywhere
    r = cli("keys", "create", "--user", "x@lbl.gov", "--models", "gpt-4o,anthropic/*,cborg-chat", env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(cli("keys", "info", r.stdout.strip(), env=env).stdout)
    assert info["models"] == ["openai/gpt-4o", "anthropic/*", "lbl/cborg-chat:latest"]


def test_admin_api(gateway):
    r = gateway.admin("POST", "/key/generate", json={"user_id": "bob@lbl.gov", "key_alias": "ci", "duration": "7d",
                                                     "models": ["lbl/llama"], "max_budget": 5,
                                                     "tpm_limit": 1000, "max_parallel_requests": 2})
    assert r.status_code == 200
    d = r.json()
    assert d["key"].startswith("sk-") and d["info"]["max_budget"] == 5 and d["info"]["tpm_limit"] == 1000
    key_id = d["key_id"]
    lst = gateway.admin("GET", "/key/list").json()
    assert key_id in lst["keys"] and d["key"] not in json.dumps(lst)
    assert gateway.admin("GET", "/key/list?user_id=bob@lbl.gov").json()["total_count"] >= 1
    up = gateway.admin("POST", "/key/update", json={"key": key_id, "rpm_limit": 5, "models": ["openai/gpt-4o"]})
    assert up.status_code == 200 and up.json()["info"]["rpm_limit"] == 5
    info = gateway.admin("GET", f"/key/info?key={key_id}").json()["info"]
    assert info["models"] == ["openai/gpt-4o"] and info["key_alias"] == "ci"
    # bad input
    assert gateway.admin("POST", "/key/generate", json={"key_alias": "no-user"}).status_code == 400
    assert gateway.admin("POST", "/key/generate", json={"user_id": "u", "rpm_limit": "many"}).status_code == 400
    assert gateway.admin("POST", "/key/update", json={"key": "key-nothing", "rpm_limit": 1}).status_code == 404
    assert gateway.admin("POST", "/key/delete", json={}).status_code == 400
    r = gateway.admin("POST", "/key/generate", json={"user_id": "u", "expires": "soon"})
    assert r.status_code == 400 and "expires" in r.json()["error"]["message"]    # a 400 naming it, not a 500
    r = gateway.admin("POST", "/key/generate", json={"user_id": "u", "expires": "2d", "store": 1})
    assert r.status_code == 200 and r.json()["expires"] is not None
    for text, blocked in (("false", False), ("true", True), (0, False)):
        up = gateway.admin("POST", "/key/update", json={"key": key_id, "blocked": text})
        assert up.status_code == 200 and up.json()["info"]["blocked"] is blocked, text
    assert gateway.admin("POST", "/key/update", json={"key": key_id, "blocked": "maybe"}).status_code == 400
    r = gateway.admin("POST", "/key/update", json={"key": key_id, "models": ["gtp-4o"]})
    assert r.status_code == 400 and "gtp-4o" in r.json()["error"]["message"]
    # deleting a list with an unknown key revokes none of them
    assert gateway.admin("POST", "/key/delete", json={"keys": [key_id, "key-nothing"]}).status_code == 404
    assert gateway.admin("GET", f"/key/info?key={key_id}").json()["info"]["revoked"] is False
    # a normal key is not the master key
    r = httpx.post(gateway.url + "/key/generate", headers={"Authorization": f"Bearer {d['key']}"},
                   json={"user_id": "x"})
    assert r.status_code == 401


def test_admin_api_off_without_master_key(tmp_path, mock_openai):
    with running_gateway(tmp_path, mock_openai, master_key=None) as gw:
        r = httpx.post(gw.url + "/key/generate", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                       json={"user_id": "x"})
        assert r.status_code == 403 and "CBORG_MASTER_KEY" in r.json()["error"]["message"]


def test_revocation_reaches_other_replica(tmp_path, mock_openai):
    """Two gateway processes on one database: a key revoked through one is refused by the other in < 5 s."""
    with gateway_replicas(tmp_path, mock_openai, 2, {"CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}"}) as urls:
        key = admin_new_key(urls[0], user_id="r@lbl.gov")
        h = {"Authorization": f"Bearer {key}"}
        assert httpx.post(urls[1] + "/v1/chat/completions", headers=h, json=CHAT).status_code == 200
        t0 = time.time()
        assert httpx.post(urls[0] + "/key/delete", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                          json={"keys": [key]}).status_code == 200
        while True:
            r = httpx.post(urls[1] + "/v1/chat/completions", headers=h, json=CHAT)
            if r.status_code == 401 or time.time() - t0 > 10:
                break
            time.sleep(0.1)
        took = time.time() - t0
        assert r.status_code == 401, r.text
        assert took < 5.0, took


@pytest.mark.parametrize("mutate,words", [
    (lambda c: c["models"][4].__setitem__("price", {"input": "cheap"}), ["models[4] (openai/gpt-4.1)", "price.input"]),
    (lambda c: c["models"][0].__setitem__("provider", "nowhere"), ["lbl/llama", "nowhere"]),
    (lambda c: c["aliases"][0].__setitem__("target", "lbl/ghost"), ["aliases[0]", "lbl/ghost"]),
    (lambda c: c["models"][1].__setitem__("mode", "painting"), ["models[1] (lbl/qwen-coder)", "mode"]),
    (lambda c: c["models"][2].__setitem__("max_tokns", 5), ["models[2] (lbl/qwen-vision)", "max_tokns"]),
    (lambda c: c["aliases"][1].__setitem__("system_prompt", "prompts/missing.md"), ["prompts/missing.md"]),
    (lambda c: c["models"][0].__setitem__("fallbacks", ["openai/gpt-4o"]),
     ["models[0] (lbl/llama)", "openai/gpt-4o", "commercial"]),
    (lambda c: c["limits"]["models"].__setitem__("openai/*", {"budget": 5}), ["limits.models", "openai/*", "budgets"]),
])
def test_config_errors_name_the_field(tmp_path, mutate, words):
    import yaml

    from router.catalog import ConfigError, load_catalog
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    mutate(conf)
    p = tmp_path / "models.yaml"
    p.write_text(yaml.safe_dump(conf))
    (tmp_path / "prompts").mkdir()
    for f in (ROOT / "prompts").iterdir():
        (tmp_path / "prompts" / f.name).write_text(f.read_text())
    with pytest.raises(ConfigError) as e:
        load_catalog(p)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_router_refuses_to_start_on_bad_config(tmp_path):
    import os
    p = tmp_path / "models.yaml"
    p.write_text("providers: {}\nmodels:\n  - {name: a/b, provider: nope, model: x}\n")
    r = subprocess.run([sys.executable, "-m", "cborg.cli", "router", "--port", str(free_port())],
                       env={**os.environ, "CBORG_CONFIG": str(p)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope" in r.stderr and "models[0]" in r.stderr


def test_router_workers_need_redis_for_shared_limits(tmp_path):
    """Several worker processes with in-process limiters would each enforce the limits on their own."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "CBORG_REDIS_URL"}
    r = subprocess.run([sys.executable, "-m", "cborg.cli", "router", "--workers", "2", "--port", str(free_port())],
                       env={**env, "CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers 2 needs CBORG_REDIS_URL" in r.stderr


def test_catalog_has_every_public_name():
    from router.catalog import load_catalog
    cat = load_catalog(ROOT / "models.yaml")
    names = """lbl/cborg-chat:latest lbl/cborg-coder:latest lbl/cborg-vision:latest lbl/llama lbl/qwen-coder
    lbl/qwen-vision lbl/nomic-embed-text openai/gpt-4o openai/gpt-4o-mini openai/gpt-4.1 openai/o1 openai/o1-mini
    openai/o3-mini anthropic/claude-haiku anthropic/claude-sonnet anthropic/claude-opus google/gemini-pro
    google/gemini-flash google/gemini-flash-lite xai/grok xai/grok-mini aws/llama-3.1-405b aws/llama-3.1-70b
    aws/llama-3.1-8b aws/command-r-plus-v1 aws/command-r-v1 openai/chatgpt:latest anthropic/claude:latest
    google/gemini:latest""".split()
    for n in names:
        assert cat.resolve(n) is not None, n
    prices = {"openai/gpt-4.1": (2, 8), "openai/gpt-4o": (5, 15), "openai/gpt-4o-mini": (0.165, 0.66),
              "openai/o1": (15.5, 60), "openai/o1-mini": (3.3, 13.2), "openai/o3-mini": (0.55, 4.4),
              "anthropic/claude-haiku": (1, 5), "anthropic/claude-sonnet": (3, 15), "anthropic/claude-opus": (15, 75),
              "google/gemini-pro": (3.5, 7), "google/gemini-flash": (0.35, 0.7), "xai/grok": (3, 15),
              "xai/grok-mini": (0.3, 0.5), "aws/llama-3.1-405b": (5.32, 16), "aws/command-r-plus-v1": (1.5, 3)}
    for n, (i, o) in prices.items():
        p = cat.resolve(n).model.price
        assert (p.input, p.output) == (i, o), n
    for n in names:
        r = cat.resolve(n)
        assert r.commercial == (not n.startswith("lbl/")), n
        if n.startswith("lbl/"):
            assert r.model.price.input == r.model.price.output == 0
