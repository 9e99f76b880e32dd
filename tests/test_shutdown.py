"""SIGTERM with streams stuck on a hung upstream (issue 14 item 7): the gateway stops within its
shutdown deadline (CBORG_SHUTDOWN_TIMEOUT_S), and every stream it cut has its ledger row with what
was delivered. Before: it waited for the upstream's read timeout (300 s). SIGKILL: the in-flight
requests have no row (README, "Limits, budgets and accounting"); figures printed for the note."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest

from router.store import open_store
from tests.helpers.servers import AiohttpServer
from tests.mocks.openai_mock import MockOpenAI
from tests.test_ledger_durability import CHAT, new_key, start

N = 6


@pytest.fixture
def hung_mock():
    """A mock of its own whose streams hang after the first chunk (its hung handlers end with it, and
    never count as active requests in the session's mock)."""
    mock = MockOpenAI()
    mock.chunk_delay = 100
    with AiohttpServer(mock.app) as srv:
        mock.url = srv.url
        yield mock

        def cancel_hung() -> None:          # (else asyncio reports them pending at exit)
            for t in asyncio.all_tasks(srv.loop):
                t.cancel()
        srv.loop.call_soon_threadsafe(cancel_hung)
        time.sleep(0.3)


def rows(db: str) -> list[dict]:
    async def q():
        s = open_store(db)
        await s.init()
        try:
            return await s.ledger_rows()
        finally:
            await s.close()
    return asyncio.run(q())


def stuck_streams(url: str, key: str, got: list) -> list[threading.Thread]:
    """N streams that each read their first chunks and then wait on the hung upstream."""
    def one():
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={**CHAT, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        got.append(line)
        except httpx.HTTPError:
            pass
    ts = [threading.Thread(target=one, daemon=True) for _ in range(N)]
    for t in ts:
        t.start()
    return ts


def test_sigterm_cuts_stuck_streams_at_the_deadline_and_accounts_them(tmp_path, hung_mock):
    db = f"sqlite:///{tmp_path / 's.db'}"
    proc, url = start(tmp_path, hung_mock, db, {"CBORG_SHUTDOWN_TIMEOUT_S": "2"})
    key = new_key(url)
    got: list = []
    ts = stuck_streams(url, key, got)
    deadline = time.time() + 10
    while len(got) < N and time.time() < deadline:
        time.sleep(0.05)
    assert len(got) >= N
    t0 = time.time()
    rc = proc.stop(signal.SIGTERM, timeout=30)
    took = time.time() - t0
    for t in ts:
        t.join(5)
    out = [r for r in rows(db) if r["model"] == "openai/gpt-4o"]
    print(f"\nSIGTERM with {N} streams stuck on a hung upstream: exited after {took:.1f} s (deadline 2 s), "
          f"{len(out)}/{N} ledger rows written, {N - len(out)} lost")
    assert rc in (0, -signal.SIGTERM) and took < 8, (rc, took, proc.output()[-2000:])
    assert len(out) == N
    assert all(r["completion_tokens"] >= 1 and r["estimated"] and r["cost"] > 0 for r in out), out


def test_sigkill_in_flight_requests_have_no_row(tmp_path, hung_mock):
    """What the README says: a SIGKILL loses the rows of requests in flight, and of those that ended
    in the last flush interval (0.5 s)."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    proc, url = start(tmp_path, hung_mock, db)
    key = new_key(url)
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=CHAT)
    assert r.status_code == 200
    time.sleep(1.2)                          # flushed
    got: list = []
    ts = stuck_streams(url, key, got)
    deadline = time.time() + 10
    while len(got) < N and time.time() < deadline:
        time.sleep(0.05)
    proc.stop(signal.SIGKILL)
    for t in ts:
        t.join(5)
    out = [r for r in rows(db) if r["model"] == "openai/gpt-4o"]
    print(f"\nSIGKILL with {N} streams in flight: {len(out)} ledger rows (the finished request's); "
          f"{N} in-flight rows lost")
    assert len(out) == 1
