"""How the gateway uses inference nodes: routing to ready engines with their served name and key,
least-outstanding balancing, 503s that say loading / swapping / not served, nodes leaving
rotation, and the models admin API. A mock node and the OpenAI mock stand in for real ones."""
from __future__ import annotations

import contextlib
import time

import httpx
import openai
import pytest

from tests.helpers.inference import MASTER_KEY, gateway_for, write_config
from tests.helpers.servers import AiohttpServer
from tests.mocks.node_mock import MockNode, deployment

TOKEN = "node-token-for-tests-0123456789"


@pytest.fixture
def mock_node():
    node = MockNode(TOKEN)
    with AiohttpServer(node.app) as srv:
        node.url = srv.url
        yield node


@contextlib.contextmanager
def gateway(tmp_path, node):
    cfg = write_config(tmp_path / "models.yaml", 1, [], unserved={"lbl/qwen-vision": "no GPUs here"})
    with gateway_for(tmp_path, cfg, node.url, poll_s=0.2, token=TOKEN) as g:   # the gateway calls it node t
        yield g


def wait_until(fn, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met")


def chat(g, key, model="lbl/llama") -> httpx.Response:
    return httpx.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)


def test_routes_to_the_ready_engine_with_its_name_and_key(tmp_path, mock_node, mock_openai):
    mock_openai.reset()
    mock_node.deployments = [deployment("llama-a", "lbl/llama", url=mock_openai.url + "/v1",
                                        api_key=mock_openai.api_key, served="google/gemma-3-270m")]
    with gateway(tmp_path, mock_node) as g:
        g.wait_model("lbl/llama")
        c = openai.OpenAI(api_key=g.new_key(), base_url=g.url, max_retries=0)
        r = c.chat.completions.create(model="lbl/cborg-chat", messages=[{"role": "user", "content": "hello"}])
        assert r.model == "google/gemma-3-270m"
        sent = mock_openai.requests[-1]
        assert sent["json"]["model"] == "google/gemma-3-270m"
        assert sent["headers"]["Authorization"] == f"Bearer {mock_openai.api_key}"   # the engine's key
        assert g.gw.nodes.models["lbl/llama"].replicas[0].outstanding == 0       # released


def test_least_outstanding_balancing(tmp_path, mock_node, mock_openai):
    mock_node.deployments = [
        deployment("a", "lbl/llama", url=mock_openai.url + "/v1", api_key=mock_openai.api_key),
        deployment("b", "lbl/llama", url=mock_openai.url.replace("127.0.0.1", "localhost") + "/v1",
                   api_key=mock_openai.api_key)]
    with gateway(tmp_path, mock_node) as g:
        g.wait_model("lbl/llama")
        reg = g.gw.nodes
        route = g.gw.catalog.resolve("lbl/llama")
        picks = [reg.pick(route) for _ in range(4)]
        a, b = reg.models["lbl/llama"].replicas
        assert (a.outstanding, b.outstanding) == (2, 2)          # spread while all are busy
        picks[0][1]()                                           # one of them finishes
        freed = a if a.outstanding == 1 else b
        ep, release = reg.pick(route)
        assert ep is freed.endpoint                             # the least busy one gets the next
        for _, rel in picks[1:] + [(ep, release)]:
            rel()
        assert (a.outstanding, b.outstanding) == (0, 0)
        # a poll keeps the counters of replicas that are still there
        assert reg.models["lbl/llama"].replicas[0] is a


def test_loading_and_swapping_answer_503_with_retry_after(tmp_path, mock_node, mock_openai):
    mock_node.deployments = [deployment("a", "lbl/llama", state="loading", phase="preparing weights")]
    with gateway(tmp_path, mock_node) as g:
        key = g.new_key()
        g.wait_model("lbl/llama", "loading")
        r = chat(g, key)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "is loading on node t" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_loading"
        r = chat(g, key, "lbl/cborg-chat")
        assert "'lbl/cborg-chat:latest' (lbl/llama) is loading" in r.json()["error"]["message"]
        # an admin swap through the gateway: the answer applies at once, no poll needed
        mock_node.deployments = [deployment("a", "lbl/llama", url=mock_openai.url + "/v1",
                                            api_key=mock_openai.api_key),
                                 deployment("b", "lbl/llama", state="stopped")]
        g.wait_model("lbl/llama")
        r = g.admin("POST", "/admin/models/swap", json={"model": "lbl/cborg-chat", "to": "b"})
        assert r.status_code == 202, r.text
        assert mock_node.calls[-1] == ("/swap", {"model": "lbl/llama", "to": "b"})
        r = chat(g, key)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "being swapped to deployment b" in r.json()["error"]["message"]
        assert "swapping" in r.json()["error"]["message"]


def test_not_served_answers_say_why(tmp_path, mock_node, mock_openai):
    mock_node.deployments = [deployment("a", "lbl/llama", state="failed", last_error="CUDA out of memory"),
                             deployment("c", "lbl/qwen-coder", state="stopped")]
    with gateway(tmp_path, mock_node) as g:
        key = g.new_key()
        g.wait_model("lbl/llama", "failed")
        r = chat(g, key)
        assert r.status_code == 503 and r.headers["x-should-retry"] == "false"
        assert "failed: CUDA out of memory" in r.json()["error"]["message"]
        r = chat(g, key, "lbl/qwen-coder")
        assert "No inference node serves 'lbl/qwen-coder'" in r.json()["error"]["message"]
        assert "unloaded" in r.json()["error"]["message"]
        r = chat(g, key, "lbl/qwen-vision")
        assert r.status_code == 503 and "not served here: no GPUs here" in r.json()["error"]["message"]
        r = httpx.post(g.url + "/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "lbl/nomic-embed-text", "input": "x"})
        assert r.status_code == 503 and "No inference node serves 'lbl/nomic-embed-text'" in r.text


def test_a_node_that_stops_answering_leaves_rotation(tmp_path, mock_node, mock_openai):
    mock_node.deployments = [deployment("a", "lbl/llama", url=mock_openai.url + "/v1", api_key=mock_openai.api_key)]
    with gateway(tmp_path, mock_node) as g:
        key = g.new_key()
        g.wait_model("lbl/llama")
        assert chat(g, key).status_code == 200
        mock_node.down = True
        wait_until(lambda: "lbl/llama" not in g.gw.nodes.models)
        r = chat(g, key)
        assert r.status_code == 503 and "(node t not answering)" in r.json()["error"]["message"]
        st = g.admin("GET", "/admin/models/status").json()
        assert st["nodes"][0]["up"] is False and "node broken" in st["nodes"][0]["error"]
        mock_node.down = False
        g.wait_model("lbl/llama")
        assert chat(g, key).status_code == 200


def test_models_admin_api(tmp_path, mock_node, mock_openai):
    mock_node.deployments = [deployment("a", "lbl/llama", url=mock_openai.url + "/v1", api_key="engine-secret-key"),
                             deployment("b", "lbl/llama", state="stopped")]
    with gateway(tmp_path, mock_node) as g:
        key = g.new_key()
        g.wait_model("lbl/llama")
        assert httpx.get(g.url + "/admin/models/status", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        st = g.admin("GET", "/admin/models/status")
        assert st.status_code == 200
        assert "engine-secret-key" not in st.text and TOKEN not in st.text
        assert st.json()["models"]["lbl/llama"]["state"] == "ready"
        assert st.json()["models"]["lbl/qwen-vision"] == {"state": "unserved", "message": "no GPUs here",
                                                         "replicas": []}
        r = g.admin("POST", "/admin/models/load", json={"name": "b"})
        assert r.status_code == 202 and mock_node.calls[-1] == ("/load", {"deployment": "b"})
        r = g.admin("POST", "/admin/models/unload", json={"name": "lbl/cborg-chat"})
        assert r.status_code == 202 and mock_node.calls[-1] == ("/unload", {"model": "lbl/llama"})
        assert r.json()["results"][0]["deployments"] == ["a", "b"]
        r = g.admin("POST", "/admin/models/load", json={"name": "nothing-like-it"})
        assert r.status_code == 404
        mock_node.refuse = (409, "cannot load b: GPU 3 would be over-committed")
        r = g.admin("POST", "/admin/models/load", json={"name": "b"})
        assert r.status_code == 409 and "GPU 3 would be over-committed" in r.json()["error"]["message"]
        r = g.admin("POST", "/admin/models/load", json={"name": "b", "node": "elsewhere"})
        assert r.status_code == 404 and "No node 'elsewhere'" in r.json()["error"]["message"]
        assert httpx.get(g.url + "/admin/models/status").status_code == 401
    assert MASTER_KEY


def test_engine_gone_since_the_last_poll_is_skipped_not_a_502(tmp_path, mock_node, mock_openai):
    """An engine killed (or unloaded) after the gateway's last poll: its requests go to another
    replica; with none left, a 503 with retry-after (the SDK waits and retries), never a 502."""
    from tests.helpers.servers import free_port
    mock_openai.reset()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    mock_node.deployments = [deployment("gone", "lbl/llama", url=dead, api_key="k"),
                             deployment("alive", "lbl/llama", url=mock_openai.url + "/v1",
                                        api_key=mock_openai.api_key)]
    with gateway(tmp_path, mock_node) as g:
        g.wait_model("lbl/llama")
        wait_until(lambda: len(g.gw.nodes.models["lbl/llama"].replicas) == 2)
        key = g.new_key()
        assert [chat(g, key).status_code for _ in range(6)] == [200] * 6
        assert len(mock_openai.requests) == 6
        mock_node.deployments = [deployment("gone", "lbl/llama", url=dead, api_key="k")]
        # the node still says "gone" is ready; wait for a poll that dropped "alive" (a chat that hit
        # "gone" also leaves one replica, "alive", until the poll it asks for puts "gone" back)
        wait_until(lambda: [r.deployment for r in g.gw.nodes.models["lbl/llama"].replicas] == ["gone"])
        for _ in range(3):
            r = chat(g, key)
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["error"]["code"] == "model_unavailable"
