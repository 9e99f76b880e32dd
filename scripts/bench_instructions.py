"""Instructions per request of the gateway with accounting off, on (memory + SQLite) and with Redis,
counted by valgrind (callgrind): repeatable to about 1 %, whatever else the machine is doing, where
wall-clock figures on this shared 2-core machine move by 30 % between runs.

The gateway's ASGI app is driven in-process (no uvicorn, no HTTP client: those cost the same in
every mode) against nginx answering a static OpenAI completion, 32 requests at a time. Each mode
runs twice, with N and 3N requests; the difference over 2N requests is the per-request cost, free
of start-up. What uvicorn adds per request is not in these figures, so the ratios here are lower
than the wall-clock benchmark's (scripts/bench_gateway), whose gateway also parses HTTP.

    python scripts/bench_instructions.py [--n 640] [--modes off,on,redis]
    python scripts/bench_instructions.py --drive MODE N      (one run; what valgrind runs)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

BODY = b'{"model":"openai/gpt-4o","messages":[{"role":"user","content":"Hello, how are you today?"}],"max_tokens":64}'
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def drive(mode: str, n: int, upstream: str, conc: int = 32) -> None:
    """Serve n chat completions through the app (after a warm-up), with every limit set on the key."""
    from bench_gateway import bench_catalog
    from router.app import create_app
    from router.config import Settings
    from router.key_admin import create_key

    tmp = Path(tempfile.mkdtemp(prefix="cborg-instr-"))
    env = {"CBORG_DATABASE_URL": f"sqlite:///{tmp}/db.sqlite", "CBORG_CONFIG": str(bench_catalog(tmp)),
           "OPENAI_API_KEY": "sk-bench-upstream", "OPENAI_BASE_URL": upstream, "CBORG_REQUEST_LOGS": "on"}
    if mode == "off":
        env["CBORG_ACCOUNTING"] = "off"
    elif mode == "redis":
        env.update(CBORG_REDIS_URL=REDIS_URL, CBORG_REDIS_PREFIX=f"instr{os.getpid()}:")
    app = create_app(Settings.from_env(env))
    gw = app.state
    await gw.start()
    secret, rec = await create_key(gw.store, "bench@lbl.gov", fields=dict(
        max_parallel=10_000, rpm=100_000_000, tpm=10_000_000_000, max_budget=1_000_000, budget_period="30d"))
    gw.keys.put(rec)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer " + secret.encode()),
                         (b"content-length", str(len(BODY)).encode())]}
    bad = 0

    async def one() -> None:
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.sleep(3600)

        async def send(m):
            nonlocal bad
            if m["type"] == "http.response.start" and m["status"] != 200:
                bad += 1
        await app(dict(scope), receive, send)

    async def worker(k: int) -> None:
        for _ in range(k):
            await one()
    await asyncio.gather(*[worker(8) for _ in range(conc)])            # warm-up
    await asyncio.gather(*[worker(n // conc) for _ in range(conc)])
    await gw.ledger.flush()        # every row written (part of the per-request cost)
    if bad:
        sys.exit(f"{bad} requests were not answered 200")
    # No gw.stop(): under valgrind the event loop sometimes never sees a worker thread's completion
    # at shutdown (not seen without valgrind); nothing after the flush is measured anyway.
    sys.stderr.write("drive: done\n")
    sys.stderr.flush()
    os._exit(0)


def instructions(mode: str, n: int, upstream: str, tmp: Path) -> int:
    out = tmp / f"cg.{mode}.{n}"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                        "--drive", mode, str(n), "--upstream", upstream], env=env, capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        sys.exit(f"{mode} {n}: {r.stderr[-2000:]}")
    return int(re.search(r"^summary: (\d+)", out.read_text(), re.M).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=640, help="requests of the short run (the long one: 3N)")
    ap.add_argument("--modes", default="off,on,redis")
    ap.add_argument("--drive", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.drive:
        import uvloop
        uvloop.install()
        asyncio.run(drive(a.drive[0], int(a.drive[1]), a.upstream))
        return
    from bench_gateway import free_port, need, start_nginx
    need("valgrind", "valgrind")
    tmp = Path(tempfile.mkdtemp(prefix="cborg-instr-"))
    port = free_port()
    nginx = start_nginx(tmp, port, "0")
    time.sleep(0.3)
    upstream = f"http://127.0.0.1:{port}/v1"
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    try:
        runs = [(m, k) for m in modes for k in (a.n, 3 * a.n)]
        with ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as ex:
            got = dict(zip(runs, ex.map(lambda mk: instructions(mk[0], mk[1], upstream, tmp), runs)))
    finally:
        nginx.terminate()
    per = {m: (got[(m, 3 * a.n)] - got[(m, a.n)]) / (2 * a.n) for m in modes}
    print(f"\ninstructions per request (callgrind; {2 * a.n} requests' difference; in-process, no HTTP server)\n")
    print("| mode | instructions / request | ratio off / mode |")
    print("|---|---|---|")
    for m in modes:
        ratio = f"{per['off'] / per[m]:.2f}" if "off" in per else "-"
        print(f"| {m} | {per[m]:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
