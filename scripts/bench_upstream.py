"""The upstream client alone: CPU per request of router/upstream.py's UpstreamPool against nginx.

Each checkout's client runs in its own process (uvloop, pinned to --cpu) and sends --requests
POSTs at concurrency 32 to nginx answering a small chat completion; the figure is CPU time per
request (user + system of that process), the median of --rounds runs, checkouts alternated so a
noisy machine weighs on both alike. With --compare DIR, DIR's client is measured too (e.g. a worktree
of the previous commit). Also --httpx / --aiohttp-session: the same load through httpx.AsyncClient and
aiohttp's ClientSession.request, for scale.

  python scripts/bench_upstream.py --compare /tmp/bench-old --httpx --aiohttp-session
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

WORKER = r'''
import asyncio, sys, time
root, kind, url, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, root)
BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hello, how are you today?"}],"max_tokens":64}'
H = [(b"authorization", b"Bearer sk-bench-upstream-0123456789"), (b"content-type", b"application/json")]

async def main():
    if kind == "pool":
        import router.upstream as up
        try:
            from router.targets import Target
        except ImportError:
            Target = up.Target
        pool = up.UpstreamPool()
        t = Target.parse(url.rsplit("/chat/completions", 1)[0])
        async def one():
            r = await pool.request(t, b"POST", "/chat/completions", H, BODY, up.Timeouts())
            await r.read()
        close = pool.close
    elif kind == "aiohttp-session":
        import aiohttp
        from yarl import URL
        s = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), connector=aiohttp.TCPConnector(limit=0),
                                  skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        u, h = URL(url), [(k.decode(), v.decode()) for k, v in H]
        async def one():
            r = await s.request("POST", u, headers=h, data=BODY, allow_redirects=False)
            await r.read()
        close = s.close
    else:
        import httpx
        c = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024))
        h = {k.decode(): v.decode() for k, v in H}
        async def one():
            (await c.post(url, headers=h, content=BODY)).read()
        close = c.aclose
    async def worker(k):
        for _ in range(k):
            await one()
    await worker(100)
    c0 = time.process_time()
    await asyncio.gather(*(worker(n // 32) for _ in range(32)))
    print((time.process_time() - c0) / (n // 32 * 32) * 1e6)
    await close()

import uvloop
uvloop.run(main())
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", metavar="DIR")
    ap.add_argument("--httpx", action="store_true")
    ap.add_argument("--aiohttp-session", action="store_true")
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", default="1")
    ap.add_argument("--nginx-cpu", default="0")
    a = ap.parse_args()
    import bench_gateway as bg
    tmp = Path(tempfile.mkdtemp(prefix="cborg-bench-upstream-"))
    port = bg.free_port()
    nginx = bg.start_nginx(tmp, port, a.nginx_cpu)
    time.sleep(0.3)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    runs = [("this checkout", "pool", ROOT)]
    if a.compare:
        runs.append((f"{a.compare}", "pool", Path(a.compare).resolve()))
    if a.aiohttp_session:
        runs.append(("aiohttp ClientSession.request", "aiohttp-session", ROOT))
    if a.httpx:
        runs.append(("httpx AsyncClient", "httpx", ROOT))
    got: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    try:
        for _ in range(a.rounds):
            for name, kind, root in runs:
                n = a.requests if kind != "httpx" else a.requests // 8
                out = subprocess.run(["taskset", "-c", a.cpu, sys.executable, "-c", WORKER, str(root), kind, url, str(n)],
                                     capture_output=True, text=True, check=True).stdout
                got[name].append(float(out.split()[-1]))
    finally:
        nginx.terminate()
    print(f"\n{bg.platform_line()}; client pinned to CPU {a.cpu}, nginx to CPU {a.nginx_cpu}; "
          f"{a.rounds} rounds, medians\n")
    print("| client | CPU per request (us) | rounds |")
    print("|---|---|---|")
    for name, v in got.items():
        print(f"| {name} ({bg.git_head(Path(name)) if Path(name).is_dir() else ''}) | {statistics.median(v):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in v)} |")


if __name__ == "__main__":
    main()
