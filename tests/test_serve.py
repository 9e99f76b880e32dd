"""`cborg serve` as a newcomer runs it: no GPU, no provider keys. Once it says it is ready, the CBorg
example that loops over every model prints an answer from each lbl/* model served here (the
instruct model knows the capital of France) and a short error for each other one; stopping it
ends the node and its engines."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.servers import ROOT, free_port

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

MASTER = "mk-serve-test-0123456789"


def test_serve_then_every_model_example(tmp_path):
    port, node_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith(("AWS_", "CBORG_"))}
    env.update(CBORG_HOME=str(tmp_path / "home"), CBORG_MASTER_KEY=MASTER, PYTHONUNBUFFERED="1")
    fh = open(tmp_path / "serve.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "cborg.cli", "serve", "--port", str(port), "--node-port",
                          str(node_port)], env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                         start_new_session=True)
    log = lambda: (tmp_path / "serve.log").read_text(errors="replace")  # noqa: E731
    try:
        deadline = time.time() + 600
        while "cborg serve: ready on" not in log():
            assert p.poll() is None, log()[-3000:]
            assert time.time() < deadline, log()[-3000:]
            time.sleep(0.5)
        ready = next(ln for ln in log().splitlines() if "cborg serve: ready on" in ln)
        assert "lbl/llama" in ready and "lbl/qwen-coder" in ready and "lbl/nomic-embed-text" in ready
        assert "lbl/qwen-vision is not served" in log()
        key = subprocess.run([sys.executable, "-m", "cborg.cli", "keys", "create", "--user", "new@lbl.gov"], env=env,
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        out = subprocess.run([sys.executable, "examples/every_model.py"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env={**env, "CBORG_API_KEY": key,
                                               "CBORG_BASE_URL": f"http://127.0.0.1:{port}"})
        assert out.returncode == 0, out.stderr
        blocks = {m.group(1): m.group(2) for m in re.finditer(r"Model: (\S+)\n(.*)\n", out.stdout)}
        names = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert set(blocks) == {m["id"] for m in names["data"]}
        for m, line in blocks.items():
            if m in ("lbl/llama", "lbl/qwen-coder", "lbl/cborg-chat:latest", "lbl/cborg-coder:latest"):
                assert line.startswith("Response: '") and "Paris" in line, (m, line)
            elif m in ("lbl/qwen-vision", "lbl/cborg-vision:latest"):
                assert line.startswith("Error 503: ") and "not served here" in line, (m, line)
            elif m == "lbl/nomic-embed-text":
                assert line.startswith("Error 400: ") and "embedding model" in line, (m, line)
            else:
                assert line.startswith("Error 503: ") and "has no credentials on this gateway" in line, (m, line)
                assert len(line) < 250, (m, line)
        st = httpx.get(f"http://127.0.0.1:{port}/admin/models/status",
                       headers={"Authorization": f"Bearer {MASTER}"}).json()
        pids = [d["pid"] for n in st["nodes"] for d in n["deployments"] if d.get("pid")]
        assert len(pids) == 3
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(90)
        fh.close()
    time.sleep(1)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    assert "stopping the local inference node" in log()
