"""Key Manager page loads on a big database: 100,000 keys and 1,000,000 ledger rows (the issue's
target: every page under 200 ms on the development machine).

Fills a database through the stores' own methods (keys with create_key; the ledger with
write_ledger in flush-sized batches, so that the daily aggregate is built as the gateway builds
it), starts a real gateway process on it (`cborg router`), and times each page with an HTTP
client: the researcher's page of the heaviest user, the admin's users (first and a deep page),
keys (first page, a page 50,000 keys deep, a prefix search matching 5,000 of them, a key by id)
and one user's page. For contrast, in the same run: the researcher's 30-day chart data read from
the aggregate and computed from the ledger, side by side.

    python scripts/bench_key_manager.py [--keys 100000] [--rows 1000000] [--db sqlite|postgresql://...]
                                        [--requests 30] [--keep DIR]

What the aggregate costs the ledger writer (a thread of the gateway's process, off the request
path): flushes of 2,000 rows written with it and without it (its function replaced by one that
returns nothing), alternating, on a fresh database of the same kind:

    python scripts/bench_key_manager.py --writer [--db ...] [--batches 100]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DAY = 86400
BATCH = 2000            # the ledger writer's max_batch
MODELS = [("openai/gpt-4o-mini", 0.165, 0.66), ("openai/gpt-4.1", 2.0, 8.0), ("anthropic/claude-sonnet", 3.0, 15.0),
          ("anthropic/claude-haiku", 1.0, 5.0), ("google/gemini-flash", 0.35, 0.7), ("xai/grok-mini", 0.3, 0.5),
          ("lbl/llama", 0.0, 0.0), ("lbl/qwen-coder", 0.0, 0.0), ("lbl/nomic-embed-text", 0.0, 0.0)]
HEAVY = "user00000@lbl.gov"
ADMIN = "admin@lbl.gov"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def fill(url: str, n_keys: int, n_rows: int, seed: int = 7) -> dict:
    from router.accounting.ledger import spend_deltas
    from router.store import open_store
    from router.store.base import KeyRecord

    rnd = random.Random(seed)
    now = time.time()
    n_users = max(1, n_keys // 5)
    users = [f"user{i:05d}@lbl.gov" for i in range(n_users)]
    store = open_store(url)
    await store.init()
    t0 = time.perf_counter()
    keys = []
    for i in range(n_keys):
        created = now - rnd.uniform(0, 400 * DAY)
        keys.append(KeyRecord(id=f"key-{i:012x}", key_hash=hashlib.sha256(f"bench-{i}".encode()).hexdigest(),
                              key_hint=f"sk-...{i % 10000:04d}", user_id=users[i % n_users],
                              alias=rnd.choice(["laptop", "pipeline", "notebook", "cluster", None]),
                              created_at=created, updated_at=created, expires_at=created + 365 * DAY,
                              revoked_at=created + DAY if rnd.random() < 0.05 else None))
    for i in range(0, n_keys, 500):
        await asyncio.gather(*(store.create_key(k) for k in keys[i:i + 500]))
    t_keys = time.perf_counter() - t0
    heavy_keys = [k for k in keys if k.user_id == HEAVY]
    t0 = time.perf_counter()
    for start in range(0, n_rows, BATCH):
        rows = []
        # a flush's rows come from the keys busy in that half second (here 50 of them); a tenth of
        # the calls are the heaviest user's, whose page sums the most
        busy = [keys[rnd.randrange(n_keys)] for _ in range(50)]
        for i in range(start, min(n_rows, start + BATCH)):
            k = rnd.choice(heavy_keys) if rnd.random() < 0.1 else rnd.choice(busy)
            model, pin, pout = rnd.choice(MODELS)
            p, c = rnd.randint(10, 4000), rnd.randint(1, 1000)
            rows.append((f"req-{i}", now - rnd.uniform(0, 60 * DAY), k.id, k.user_id, model, model, "bench", p, 0, c,
                         (p * pin + c * pout) / 1e6, 200, 100.0, 50.0, 0, 0, "chat/completions"))
        kd, ud = spend_deltas(rows, {})
        await store.write_ledger(rows, kd, ud, now)
    t_rows = time.perf_counter() - t0
    count = (await store.ledger_totals())[0]
    await store.close()
    return {"keys": n_keys, "users": n_users, "rows": count, "fill_keys_s": t_keys, "fill_rows_s": t_rows}


def session_cookie(secret: str, who: dict) -> str:
    """A Key Manager session as Starlette's SessionMiddleware signs it (the researcher's page wants
    an OIDC sign-in; this benchmark has no provider, so it signs the session itself)."""
    import itsdangerous
    data = base64.b64encode(json.dumps({"who": who, "csrf": "bench"}).encode())
    return itsdangerous.TimestampSigner(secret).sign(data).decode()


def timed(client, path: str, n: int) -> dict:
    for _ in range(3):
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(path)
        ts.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200
    ts.sort()
    return {"median": statistics.median(ts), "p95": ts[int(len(ts) * 0.95) - 1], "max": ts[-1], "bytes": len(r.content)}


async def chart_sources(url: str, n: int) -> dict:
    """The heavy user's 30-day data from the aggregate (what the page reads), and the same computed
    from the ledger (what it would cost without the aggregate), in turn, n times each."""
    from router.store import open_store
    store = open_store(url)
    await store.init()
    since = int(time.time() // DAY) - 29
    agg, scan = [], []
    pg = url.startswith("postgres")
    sql = ("SELECT CAST(ts / 86400 AS INTEGER) AS day, key_id, model, COUNT(*), SUM(cost) FROM ledger "
           "WHERE user_id = {p1} AND ts >= {p2} GROUP BY 1, 2, 3")
    for _ in range(n):
        t = time.perf_counter()
        await store.daily_spend(HEAVY, since)
        agg.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        if pg:
            await store.pool.fetch(sql.format(p1="$1", p2="$2"), HEAVY, since * DAY)
        else:
            await store._run(lambda db: db.execute(sql.format(p1="?", p2="?"), (HEAVY, since * DAY)).fetchall())
        scan.append((time.perf_counter() - t) * 1000)
    await store.close()
    return {"aggregate_ms": statistics.median(agg), "ledger_ms": statistics.median(scan)}


async def cursor_at(url: str, n: int) -> str:
    """The keys page cursor after the n newest keys."""
    from router.store import open_store
    s = open_store(url)
    await s.init()
    page = await s.search_keys(None, None, n)
    await s.close()
    return f"{page[-1].created_at!r}_{page[-1].id}"


async def writer_cost(url: str, batches: int, seed: int = 11) -> dict:
    """CPU seconds of this process per ledger row written, with the daily aggregate and without,
    batches alternating (the rows of a flush: a few busy keys and models, as in a real half second)."""
    from router.accounting.ledger import spend_deltas
    from router.store import open_store
    import router.store.postgres as pg
    import router.store.sqlite as sq

    mod = pg if url.startswith("postgres") else sq
    rnd = random.Random(seed)
    store = open_store(url)
    await store.init()
    now = time.time()
    keys = [(f"key-w{i}", f"writer{i % 10}@lbl.gov") for i in range(40)]
    real = mod.daily_totals
    cpu = {"with": 0.0, "without": 0.0}
    try:
        for b in range(2 * batches + 2):
            rows = []
            for i in range(BATCH):
                k, u = rnd.choice(keys)
                model = rnd.choice(MODELS)[0]
                rows.append((f"w{b}-{i}", now, k, u, model, model, "bench", 100, 0, 20, 0.0001, 200, 10.0, 5.0,
                             0, 0, "chat/completions"))
            mode = "with" if b % 2 else "without"
            mod.daily_totals = real if mode == "with" else (lambda rows: [])
            t = time.process_time()
            await store.write_ledger(rows, *spend_deltas(rows, {}), now)
            if b >= 2:                                   # (the first pair warms up)
                cpu[mode] += time.process_time() - t
    finally:
        mod.daily_totals = real
        await store.close()
    per = {m: cpu[m] / (batches * BATCH) * 1e6 for m in cpu}
    return {**per, "ratio": per["without"] / per["with"]}


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--db", default="sqlite", help="sqlite (a file in the work directory) or a postgresql:// URL")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--keep", help="work directory to keep (and reuse: an existing database is not filled again)")
    ap.add_argument("--writer", action="store_true", help="the ledger writer's cost with and without the aggregate")
    ap.add_argument("--batches", type=int, default=100)
    a = ap.parse_args()
    if a.writer:
        work = Path(tempfile.mkdtemp(prefix="cborg-km-writer-"))
        url = f"sqlite:///{work / 'w.db'}" if a.db == "sqlite" else a.db
        r = asyncio.run(writer_cost(url, a.batches))
        print(f"ledger writer, {a.batches} flushes of {BATCH} rows each way ({a.db}): CPU per row "
              f"{r['with']:.1f} us with the aggregate, {r['without']:.1f} us without (without / with {r['ratio']:.2f})")
        shutil.rmtree(work, ignore_errors=True)
        return

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cborg-km-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{work / 'cborg.db'}" if a.db == "sqlite" else a.db
    marker = work / "filled.json"
    if marker.exists():
        filled = json.loads(marker.read_text())
    else:
        print(f"filling {url}: {a.keys:,} keys, {a.rows:,} ledger rows ...", file=sys.stderr)
        filled = asyncio.run(fill(url, a.keys, a.rows))
        marker.write_text(json.dumps(filled))
    print(f"filled: {filled}", file=sys.stderr)

    master, port = "mk-bench-0123456789abcdef", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CBORG_DATABASE_URL": url, "CBORG_MASTER_KEY": master,
           "CBORG_HOME": str(work), "CBORG_OIDC_ISSUER": "http://127.0.0.1:9", "CBORG_OIDC_CLIENT_ID": "bench",
           "CBORG_ADMIN_EMAILS": ADMIN, "CBORG_REQUEST_LOGS": "off", "CBORG_PROFILE": "cpu"}
    log = open(work / "gateway.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cborg.cli", "router", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health/readiness", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the gateway did not start: {(work / 'gateway.log').read_text()[-2000:]}")
            time.sleep(0.2)
        from router.control.key_manager.sessions import session_secret
        from router.config import Settings
        secret = session_secret(Settings.from_env({"CBORG_MASTER_KEY": master}))[0]
        researcher = httpx.Client(base_url=base, timeout=60)
        researcher.cookies.set("cborg_km", session_cookie(secret, {"via": "oidc", "email": HEAVY}), path="/key/manage")
        admin = httpx.Client(base_url=base, timeout=60)
        admin.cookies.set("cborg_km", session_cookie(secret, {"via": "oidc", "email": ADMIN}), path="/key/manage")
        cursor = asyncio.run(cursor_at(url, min(50_000, filled["keys"] // 2)))
        mid_user = f"user{filled['users'] // 2:05d}@lbl.gov"
        prefix_keys = sum(1 for i in range(filled["keys"]) if f"user{i % filled['users']:05d}".startswith("user01"))
        pages = {
            "researcher: /key/manage (heaviest user)": (researcher, "/key/manage"),
            "admin: users, first page": (admin, "/key/manage/admin/users"),
            "admin: users, a page half-way": (admin, f"/key/manage/admin/users?after={mid_user}"),
            "admin: keys, first page": (admin, "/key/manage/admin/keys"),
            "admin: keys, 50,000 keys deep": (admin, f"/key/manage/admin/keys?before={cursor}"),
            f"admin: keys, search 'user01' ({prefix_keys:,} keys match)": (admin, "/key/manage/admin/keys?q=user01"),
            "admin: keys, search by key id": (admin, "/key/manage/admin/keys?q=key-000000000abc"),
            "admin: one user's page (heaviest)": (admin, f"/key/manage/admin/user?u={HEAVY}"),
        }
        results = {name: timed(c, path, a.requests) for name, (c, path) in pages.items()}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    sources = asyncio.run(chart_sources(url, a.requests))
    print(f"\n{filled['keys']:,} keys, {filled['users']:,} users, {filled['rows']:,} ledger rows ({a.db}); "
          f"{a.requests} requests a page after 3 warm-up, one client, keep-alive\n")
    print("| page | median (ms) | p95 (ms) | max (ms) | bytes |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median']:.1f} | {r['p95']:.1f} | {r['max']:.1f} | {r['bytes']:,} |")
    print(f"\nheaviest user's 30-day data: aggregate {sources['aggregate_ms']:.2f} ms, computed from the ledger "
          f"{sources['ledger_ms']:.1f} ms (x{sources['ledger_ms'] / max(sources['aggregate_ms'], 1e-6):.0f})")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
