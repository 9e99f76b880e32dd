"""A real node's lifecycle with the real CPU engines: swap under load, a killed engine restarted,
unload that really ends the process, GPU over-commit refused, the admin commands (`cborg models`)."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.helpers.inference import HF_TOKEN, NODE_TOKEN, SECRETS, cli, minilm, node_and_gateway, smollm

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]   # the first start may convert weights


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:      # a zombie is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    deps = [smollm("llama-t"),
            minilm("embed-a"),
            minilm("embed-b", autoload=False, embeddings={"truncate": True}),
            # declared on GPU 0 of a node that says it has one (they run on the CPU all the same)
            minilm("gpu-a", model="lbl/qwen-vision", autoload=False, gpus=[0], gpu_memory=0.6),
            minilm("gpu-b", model="lbl/qwen-coder", autoload=False, gpus=[0], gpu_memory=0.5)]
    with node_and_gateway(tmp_path_factory.mktemp("lifecycle"), deps,
                          node={"gpus": [{"index": 0, "memory_gib": 80}]}) as (node, gw):
        yield node, gw


@pytest.fixture(scope="module")
def key(stack):
    return stack[1].new_key()


def post(gw, key, path, body, timeout=60) -> httpx.Response:
    return httpx.post(gw.url + path, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=timeout)


def chat(gw, key) -> httpx.Response:
    return post(gw, key, "/v1/chat/completions", {"model": "lbl/llama", "max_tokens": 2, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "Hi"}]})


def embed(gw, key) -> httpx.Response:
    return post(gw, key, "/v1/embeddings", {"model": "lbl/nomic-embed-text", "input": "hello"})


def test_node_api_needs_the_token(stack):
    node, gw = stack
    assert httpx.get(node.url + "/status").status_code == 401
    assert httpx.get(node.url + "/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert node.call("GET", "/status").json()["node"] == "t"


def test_node_api_bad_input_is_a_400_naming_the_field(stack):
    node, gw = stack
    for path, body, field in (("/load", {"deployment": 5}, "deployment"), ("/unload", {"model": ["x"]}, "model"),
                              ("/swap", {"model": "lbl/llama"}, "to"), ("/swap", {"model": "m", "to": {}}, "to"),
                              ("/load", {"deployment": "llama-t", "force": True}, "force")):
        r = node.call("POST", path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (path, body, r.text)
    for raw in (b"[]", b"not json", b"{" * 5000):
        r = node.call("POST", "/load", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), (raw[:10], r.text)
    r = node.call("POST", "/load", json={})
    assert r.status_code == 400 and r.json()["error"]["param"] == "deployment"
    assert node.call("POST", "/load", content=b"x" * (2 << 20)).status_code == 413


def test_engines_do_not_see_the_secrets(stack):
    """The node's environment holds the node token and gateway credentials; its engines get neither,
    but keep HF_TOKEN, and number GPUs as nvidia-smi does."""
    node, gw = stack
    for name in ("llama-t", "embed-a"):
        env = environ(node.deployment(name)["pid"])
        leaked = [k for k, v in env.items() if k in SECRETS or any(s in v for s in (NODE_TOKEN, *SECRETS.values()))]
        assert not leaked, (name, leaked)
        assert env["HF_TOKEN"] == HF_TOKEN and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_dimensions_on_a_model_without_matryoshka(stack, key):
    """embed-a is not Matryoshka: another size is a 400 naming the model; its own size is a no-op."""
    node, gw = stack
    body = {"model": "lbl/nomic-embed-text", "input": "hello", "encoding_format": "float"}
    r = post(gw, key, "/v1/embeddings", {**body, "dimensions": 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert "fixed 384-dimensional embeddings" in r.json()["error"]["message"]
    plain = post(gw, key, "/v1/embeddings", body).json()["data"][0]["embedding"]
    native = post(gw, key, "/v1/embeddings", {**body, "dimensions": 384}).json()["data"][0]["embedding"]
    assert len(native) == 384 and max(abs(a - b) for a, b in zip(native, plain)) < 1e-6


def test_models_status_command(stack):
    node, gw = stack
    r = cli("models", "--url", gw.url, "status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["NODE", "DEPLOYMENT", "MODEL", "ENGINE", "STATE"]
    row = next(ln for ln in lines if " llama-t " in ln)
    assert "lbl/llama" in row and "transformers" in row and " ready " in row
    assert any(" embed-b " in ln and " stopped " in ln for ln in lines)
    r = cli("models", "--url", gw.url, "status", env={"CBORG_MASTER_KEY": "wrong-key-0123456789"})
    assert r.returncode == 1 and "HTTP 401" in r.stderr


def test_swap_under_load(stack, key):
    """Other models keep answering; the swapped model answers only 200 (before/after) or 503 with
    retry-after saying it is being swapped; the old engine process ends."""
    node, gw = stack
    old_pid = node.deployment("embed-a")["pid"]
    results: dict[str, list] = {"chat": [], "embed": []}
    stop = threading.Event()

    def hammer(kind, fn):
        while not stop.is_set():
            r = fn(gw, key)
            results[kind].append((r.status_code, r.headers.get("retry-after"),
                                  r.json().get("error", {}).get("message", "") if r.status_code != 200 else ""))

    threads = [threading.Thread(target=hammer, args=("chat", chat)),
               threading.Thread(target=hammer, args=("embed", embed)),
               threading.Thread(target=hammer, args=("embed", embed))]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        r = cli("models", "--url", gw.url, "swap", "lbl/nomic-embed-text", "--to", "embed-b")
        assert r.returncode == 0, r.stderr + r.stdout
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert "embed-b: ready" in r.stderr
    chats = results["chat"]
    assert chats and all(c == 200 for c, _, _ in chats), chats
    codes = [c for c, _, _ in results["embed"]]
    assert set(codes) <= {200, 503}, results["embed"]
    refused = [x for x in results["embed"] if x[0] == 503]
    assert refused, "no request saw the swap"
    assert all(ra == "5" and "swapping" in msg for _, ra, msg in refused), refused
    assert codes[-1] == 200                          # served by the new deployment
    assert node.deployment("embed-a")["state"] == "stopped"
    assert node.deployment("embed-b")["state"] == "ready"
    assert not alive(old_pid)
    # the new deployment truncates over-long inputs where the old one refused them
    r = post(gw, key, "/v1/embeddings", {"model": "lbl/nomic-embed-text", "input": "word " * 400})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
    print(f"swap under load: {len(chats)} chat requests all 200; embeddings {codes.count(200)} x 200, "
          f"{len(refused)} x 503 swapping")


def test_killed_engine_is_restarted_and_reported(stack, key):
    node, gw = stack
    d = node.deployment("llama-t")
    os.kill(d["pid"], signal.SIGKILL)
    back = node.wait("llama-t", "ready", pred=lambda x: x["pid"] not in (None, d["pid"]))
    assert back["restarts"] == d["restarts"] + 1
    assert back["last_error"].startswith("engine killed by SIGKILL; its last output: ")
    gw.wait_model("lbl/llama")
    assert chat(gw, key).status_code == 200
    r = cli("models", "--url", gw.url, "status")
    row = next(ln for ln in r.stdout.splitlines() if " llama-t " in ln)
    assert row.split()[7] == str(back["restarts"])


def test_unload_ends_the_process_then_load(stack, key):
    node, gw = stack
    pid = node.deployment("llama-t")["pid"]
    r = cli("models", "--url", gw.url, "unload", "lbl/llama")
    assert r.returncode == 0, r.stderr
    assert node.deployment("llama-t")["state"] == "stopped"
    assert not alive(pid)
    gw.wait_model("lbl/llama", "stopped")
    r = chat(gw, key)
    assert r.status_code == 503 and r.headers.get("x-should-retry") == "false"
    assert "unloaded" in r.json()["error"]["message"]
    r = cli("models", "--url", gw.url, "load", "lbl/cborg-chat")   # an alias names its model
    assert r.returncode == 0, r.stderr
    assert "llama-t: ready" in r.stderr
    gw.wait_model("lbl/llama")
    assert chat(gw, key).status_code == 200


def test_loading_model_answers_503_with_retry_after(stack, key):
    node, gw = stack
    r = gw.admin("POST", "/admin/models/load", json={"name": "gpu-b"})
    assert r.status_code == 202, r.text
    assert r.json()["results"][0]["deployments"] == ["gpu-b"]
    resp = post(gw, key, "/v1/chat/completions", {"model": "lbl/qwen-coder",
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert "is loading on node t" in resp.json()["error"]["message"]
    node.wait("gpu-b", "ready")


def test_gpu_over_commit_is_refused(stack):
    node, gw = stack
    node.wait("gpu-b", "ready")                       # holds 0.5 of GPU 0
    r = gw.admin("POST", "/admin/models/load", json={"name": "gpu-a"})   # wants 0.6
    assert r.status_code == 409, r.text
    msg = r.json()["error"]["message"]
    assert "GPU 0 would be over-committed" in msg and "gpu-b (0.5)" in msg and "gpu-a needs 0.6" in msg
    assert node.deployment("gpu-a")["state"] == "stopped"
    r = cli("models", "--url", gw.url, "load", "gpu-a")
    assert r.returncode == 1 and "over-committed" in r.stderr
    st = node.status()
    assert st["gpus"][0]["held_by"] == ["gpu-b"]
    gw.admin("POST", "/admin/models/unload", json={"name": "gpu-b"})
    node.wait("gpu-b", "stopped", timeout=60)
    r = gw.admin("POST", "/admin/models/load", json={"name": "gpu-a"})   # fits now
    assert r.status_code == 202, r.text
    node.wait("gpu-a", "ready")
    assert node.deployment("gpu-a")["gpus"] == [0]
    assert environ(node.deployment("gpu-a")["pid"])["CUDA_VISIBLE_DEVICES"] == "0"


def test_admin_api_needs_the_master_key(stack, key):
    node, gw = stack
    r = httpx.get(gw.url + "/admin/models/status", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401
    r = gw.admin("POST", "/admin/models/swap", json={"model": "lbl/llama", "to": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    assert NODE_TOKEN not in gw.admin("GET", "/admin/models/status").text
