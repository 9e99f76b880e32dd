"""The ledger under process death: SIGTERM under load loses nothing, SIGKILL at most about a second;
budgets survive restarts; a dead replica's parallel slots come back after the lease."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from router.store import open_store
from tests.conftest import MASTER_KEY, provider_env, write_catalog
from tests.helpers.servers import ROOT, free_port, gateway_proc, wait_http

CHAT = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hello"}]}


def start(tmp_path, mock, db: str, extra_env: dict | None = None, edit=None, name="gw"):
    cfg = write_catalog(tmp_path / f"{name}.yaml", mock.url, edit)
    env = {**provider_env(mock), "CBORG_CONFIG": str(cfg), "CBORG_MASTER_KEY": MASTER_KEY,
           "CBORG_DATABASE_URL": db, **(extra_env or {})}
    port = free_port()
    proc = gateway_proc(port, env, tmp_path / f"{name}-{port}.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/readiness", proc=proc.p)
    return proc, url


def new_key(url: str, **fields) -> str:
    r = httpx.post(url + "/key/generate", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                   json={"user_id": "dur@lbl.gov", **fields})
    assert r.status_code == 200, r.text
    return r.json()["key"]


def ledger(db: str) -> tuple[int, float]:
    async def q():
        s = open_store(db)
        await s.init()
        try:
            return await s.ledger_totals()
        finally:
            await s.close()
    return asyncio.run(q())


def load(url: str, key: str, stop: threading.Event, results: list, conc: int = 16, body=CHAT) -> threading.Thread:
    """Requests in a loop from `conc` tasks until `stop`; records (status, cost, finish time)."""
    async def main():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=conc * 2)) as c:
            async def worker():
                while not stop.is_set():
                    try:
                        r = await c.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                         json=body)
                    except httpx.HTTPError:
                        results.append((None, 0.0, time.time()))
                        await asyncio.sleep(0.05)
                        continue
                    cost = float(r.headers.get("x-litellm-response-cost", 0)) if r.status_code == 200 else 0.0
                    results.append((r.status_code, cost, time.time()))
            await asyncio.gather(*[worker() for _ in range(conc)])
    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigterm_under_load_loses_no_ledger_row(tmp_path, fresh_mock, backend, request):
    db = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'l.db'}"
    fresh_mock.delay = 0.02
    proc, url = start(tmp_path, fresh_mock, db)
    key = new_key(url)
    stop, results = threading.Event(), []
    t = load(url, key, stop, results)
    time.sleep(2.0)
    assert proc.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM), proc.output()[-2000:]
    assert "Application shutdown complete" in proc.output()
    stop.set()
    t.join(15)
    ok = [r for r in results if r[0] == 200]
    assert len(ok) > 100
    n, total = ledger(db)
    assert n == len(ok), (n, len(ok))
    assert total == pytest.approx(sum(r[1] for r in ok), rel=1e-9)


def test_sigkill_loses_at_most_about_a_second(tmp_path, fresh_mock):
    db = f"sqlite:///{tmp_path / 'k.db'}"
    fresh_mock.delay = 0.02
    proc, url = start(tmp_path, fresh_mock, db)
    key = new_key(url)
    stop, results = threading.Event(), []
    t = load(url, key, stop, results)
    time.sleep(2.5)
    killed_at = time.time()
    proc.stop(signal.SIGKILL)
    stop.set()
    t.join(15)
    ok = [r for r in results if r[0] == 200]
    n, _ = ledger(db)
    settled = [r for r in ok if r[2] < killed_at - 1.0]   # answered more than a second before the kill
    assert len(settled) <= n <= len(ok), (len(settled), n, len(ok))


def test_budget_survives_restart(tmp_path, fresh_mock):
    db = f"sqlite:///{tmp_path / 'b.db'}"
    proc, url = start(tmp_path, fresh_mock, db)
    key = new_key(url, max_budget=0.0001)
    h = {"Authorization": f"Bearer {key}"}
    big = {**CHAT, "messages": [{"role": "user", "content": "tokens " * 100}]}
    r = httpx.post(url + "/v1/chat/completions", headers=h, json=big)
    spent = float(r.headers["x-litellm-response-cost"])
    assert r.status_code == 200 and spent > 0.0001
    assert proc.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    proc, url = start(tmp_path, fresh_mock, db, name="gw2")
    try:
        r = httpx.post(url + "/v1/chat/completions", headers=h, json=CHAT)
        assert r.status_code == 429 and "Budget exceeded" in r.json()["error"]["message"]
        info = httpx.get(url + "/key/info", headers=h).json()["info"]
        assert info["spend"] == pytest.approx(spent)
    finally:
        proc.stop()


def test_killed_replica_does_not_block_beyond_lease(tmp_path, fresh_mock, pg_url, redis_url, redis_prefix):
    def edit(conf):
        conf["limits"] = {"lease_s": 3}
    env = {"CBORG_REDIS_URL": redis_url, "CBORG_REDIS_PREFIX": redis_prefix}
    a, url_a = start(tmp_path, fresh_mock, pg_url, env, edit, name="a")
    b, url_b = start(tmp_path, fresh_mock, pg_url, env, edit, name="b")
    try:
        key = new_key(url_a, max_parallel_requests=2)
        time.sleep(2.5)                                    # replica b learns the key
        h = {"Authorization": f"Bearer {key}"}
        fresh_mock.chunk_delay = 1.0                       # two long streams hold both slots on a
        def hold():
            try:
                httpx.post(url_a + "/v1/chat/completions", headers=h, json={**CHAT, "stream": True}, timeout=30)
            except httpx.HTTPError:
                pass                                       # the replica is killed under it
        holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
        for th in holders:
            th.start()
        time.sleep(1.0)
        assert httpx.post(url_b + "/v1/chat/completions", headers=h, json=CHAT).status_code == 429
        a.stop(signal.SIGKILL)                            # dies holding both slots
        killed = time.time()
        fresh_mock.chunk_delay = 0.0
        while True:
            r = httpx.post(url_b + "/v1/chat/completions", headers=h, json=CHAT)
            if r.status_code == 200 or time.time() - killed > 10:
                break
            time.sleep(0.2)
        waited = time.time() - killed
        assert r.status_code == 200
        assert waited <= 3.0 + 1.5, waited                 # the lease (3 s), not forever
    finally:
        a.stop()
        b.stop()


def test_request_log_lines_are_json_without_secrets(tmp_path, fresh_mock):
    db = f"sqlite:///{tmp_path / 'log.db'}"
    proc, url = start(tmp_path, fresh_mock, db)
    key = new_key(url, rpm_limit=2)
    h = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        httpx.post(url + "/v1/chat/completions", headers=h, json=CHAT)
    time.sleep(0.8)
    proc.stop()
    lines = [json.loads(x) for x in proc.output().splitlines() if x.startswith("{")]
    reqs = [x for x in lines if x.get("logger") == "cborg.request"]
    assert [x["status"] for x in reqs] == [200, 200, 429]
    for x in reqs:
        assert x["request_id"].startswith("req-") and x["key_id"].startswith("key-") and x["model"] == "openai/gpt-4o"
    assert reqs[0]["latency_ms"] > 0 and reqs[0]["cost"] > 0 and reqs[2]["limit"] == "rpm"
    assert key not in proc.output() and fresh_mock.api_key not in proc.output()


def test_request_log_lines_go_to_the_captured_logs(tmp_path, fresh_mock, caplog, capfd):
    """In a process whose logging is set up (tests, `cborg serve`, `cborg router`), the lines go through
    the `cborg.request` logger: into the test's captured logs, never past pytest's capture onto the
    terminal between its dots (they were written straight to sys.stderr)."""
    from tests.conftest import running_gateway
    caplog.set_level(logging.INFO, logger="cborg.request")
    with running_gateway(tmp_path, fresh_mock) as gw:
        h = {"Authorization": f"Bearer {gw.new_key()}"}
        assert httpx.post(gw.url + "/v1/chat/completions", headers=h, json=CHAT).status_code == 200
        gw.run(gw.gw.ledger.flush())
    lines = [json.loads(x) for r in caplog.records if r.name == "cborg.request" for x in r.getMessage().splitlines()]
    assert [(x["model"], x["status"]) for x in lines] == [("openai/gpt-4o", 200)]
    assert "cborg.request" not in capfd.readouterr().err


def test_request_log_lines_without_logging_set_up_go_to_stderr(tmp_path):
    """uvicorn's --workers processes are spawned without the CLI's logging set-up: their lines still
    reach stderr, as they are."""
    prog = ("import asyncio\nfrom router.accounting.ledger import Ledger\nled = Ledger(None)\n"
            "led.log({'logger': 'cborg.request', 'status': 200})\nasyncio.run(led.flush())\n")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and json.loads(out.stderr) == {"logger": "cborg.request", "status": 200}, out


def test_postgres_migrations_idempotent_and_concurrent(pg_url):
    async def main():
        stores = [open_store(pg_url) for _ in range(3)]
        await asyncio.gather(*[s.init() for s in stores])          # replicas starting together
        again = open_store(pg_url)
        await again.init()
        v = await again.pool.fetchval("SELECT version FROM schema_version")
        for s in [*stores, again]:
            await s.close()
        return v
    from router.store.postgres import MIGRATIONS
    assert asyncio.run(main()) == len(MIGRATIONS)


async def test_stop_during_a_slow_flush_loses_no_row():
    """Stopping while the writer is inside a flush (a slow database) waits for it, then flushes the rest."""
    from router.accounting.ledger import Ledger

    class SlowStore:
        def __init__(self):
            self.rows, self.writing = [], asyncio.Event()

        async def write_ledger(self, rows, keys, users, now):
            self.writing.set()
            await asyncio.sleep(0.3)          # a cancellation here would roll the batch back
            self.rows += rows

    store = SlowStore()
    led = Ledger(store, interval=0.01, log_requests=False)
    await led.start()
    row = lambda i: (f"r{i}", 0.0, "k", "u", "m", "m", "p", 1, 0, 1, 0.5, 200, 1.0, None, False, False)  # noqa: E731
    for i in range(10):
        led.add(row(i), (None, None))
    await asyncio.wait_for(store.writing.wait(), 2)
    for i in range(10, 15):
        led.add(row(i), (None, None))
    await led.stop()
    assert sorted(r[0] for r in store.rows) == sorted(f"r{i}" for i in range(15))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_store_spends_after_ledger_writes(tmp_path, backend, request):
    """What the Redis limiter reconciles against: each key's and user's spend as the ledger wrote it."""
    from router.key_admin import create_key
    from router.accounting.ledger import SpendDelta
    db = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path / 's.db'}"
    now = time.time()

    async def main():
        s = open_store(db)
        await s.init()
        try:
            _, a = await create_key(s, "a@lbl.gov")
            _, b = await create_key(s, "b@lbl.gov")
            await s.write_ledger([], {a.id: SpendDelta(0.25, 86400.0), b.id: SpendDelta(0.5, None)},
                                 {"a@lbl.gov": SpendDelta(0.25, 86400.0), "b@lbl.gov": SpendDelta(0.5, None)}, now)
            await s.write_ledger([], {a.id: SpendDelta(0.125, 86400.0)}, {"a@lbl.gov": SpendDelta(0.125, 86400.0)}, now)
            return a, b, await s.spends([a.id, b.id, "key-none"], ["a@lbl.gov", "b@lbl.gov", "nobody@lbl.gov"])
        finally:
            await s.close()
    k1, k2, got = asyncio.run(main())
    assert got[f"k:{k1.id}"][0] == pytest.approx(0.375) and got[f"k:{k1.id}"][1] == pytest.approx(now + 86400)
    assert got[f"k:{k2.id}"] == (0.5, None)
    assert got["u:a@lbl.gov"][0] == pytest.approx(0.375) and got["u:b@lbl.gov"] == (0.5, None)
    assert "k:key-none" not in got and "u:nobody@lbl.gov" not in got
