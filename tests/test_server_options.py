"""The uvicorn options every process shares (common/server.py), and uvicorn's --workers processes,
which start from the app factory alone: their logging is set up there (JSON lines on stderr)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import MASTER_KEY
from tests.helpers.servers import ROOT, free_port, gateway_proc, wait_http


def test_a_bad_deadline_stops_the_process_naming_the_variable(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cborg.cli", "router", "--port", str(free_port())], cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "CBORG_HEAD_TIMEOUT_S": "soon", "PYTHONPATH": str(ROOT),
                            "CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "CBORG_HEAD_TIMEOUT_S='soon'" in r.stderr, r.stderr[-500:]


def test_workers_log_json_lines(tmp_path, redis_url, redis_prefix):
    port = free_port()
    env = {"CBORG_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}", "CBORG_MASTER_KEY": MASTER_KEY,
           "CBORG_REDIS_URL": redis_url, "CBORG_REDIS_PREFIX": redis_prefix}
    proc = gateway_proc(port, env, tmp_path / "gw.log", extra=["--workers", "2"])
    try:
        wait_http(f"http://127.0.0.1:{port}/health/readiness", proc=proc.p, timeout=60)
        time.sleep(1.0)
    finally:
        proc.stop()
    lines = []
    for line in proc.output().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    started = [x for x in lines if x.get("msg") == "Application startup complete."]
    assert len(started) == 2, proc.output()[-2000:]          # one JSON line from each worker
