"""Admins' transitions racing each other on a real node (`cborg node`), with stand-in engines
(tests/helpers/stand_in_engine.py) so that only the node's bookkeeping is under test. Before: a
second swap while the first still drained left both new deployments running (on a GPU node, past
the memory the check had counted), and an unload of the deployment a swap was bringing up was
undone when the swap went on to start it."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.inference import NODE_TOKEN, NodeUnderTest, write_config
from tests.helpers.servers import free_port

STAND_IN = str(Path(__file__).parent / "helpers" / "stand_in_engine.py")


def dep(name: str, autoload: bool = False) -> dict:
    return {"name": name, "model": "lbl/llama", "node": "t", "engine": "vllm", "weights": str(Path(__file__).parent),
            "served_model_name": "stand-in", "autoload": autoload, "startup_timeout_s": 60,
            "vllm": {"command": [sys.executable, STAND_IN]}}


@pytest.fixture
def node(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "models.yaml", port, [dep("dep-a", autoload=True), dep("dep-b"), dep("dep-c")],
                       node={"drain_grace_s": 1.0})          # a swap's drain takes a second at least
    n = NodeUnderTest(tmp_path, cfg, port)
    try:
        n.wait("dep-a", "ready", timeout=60)
        yield n
    finally:
        n.stop()


def post(n: NodeUnderTest, path: str, body: dict) -> httpx.Response:
    return httpx.post(n.url + path, json=body, headers={"Authorization": f"Bearer {NODE_TOKEN}"}, timeout=30)


def settled(n: NodeUnderTest, seconds: float = 6.0) -> dict[str, str]:
    """The states once nothing has been loading or draining for a while."""
    deadline, quiet = time.time() + 60, None
    while time.time() < deadline:
        states = {d: n.deployment(d)["state"] for d in ("dep-a", "dep-b", "dep-c")}
        if any(s in ("loading", "draining") for s in states.values()):
            quiet = None
        elif quiet is None:
            quiet = time.time()
        elif time.time() - quiet > seconds:
            return states
        time.sleep(0.2)
    raise TimeoutError(states)


def test_a_second_swap_while_the_first_drains_wins_alone(node):
    assert post(node, "/swap", {"model": "lbl/llama", "to": "dep-b"}).status_code == 202
    r = post(node, "/swap", {"model": "lbl/llama", "to": "dep-c"})
    assert r.status_code == 202, r.text
    assert settled(node) == {"dep-a": "stopped", "dep-b": "stopped", "dep-c": "ready"}


def test_an_unload_during_a_swap_is_not_undone(node):
    assert post(node, "/swap", {"model": "lbl/llama", "to": "dep-b"}).status_code == 202
    assert post(node, "/unload", {"deployment": "dep-b"}).status_code == 202
    assert settled(node) == {"dep-a": "stopped", "dep-b": "stopped", "dep-c": "stopped"}
