"""Several processes start on one fresh store at the same moment (`--workers N`, replicas, a
restart while another is up): each migrates it, none fails, and the schema ends whole, once.
CI found the SQLite store losing this race: two workers both read version 0 and the second's
CREATE TABLE failed, so the server refused to start."""
from __future__ import annotations

import asyncio
import multiprocessing as mp

import pytest

from router.store import open_store

PROCS = 6


def _migrate(url: str, barrier, out) -> None:
    async def go():
        s = open_store(url)
        try:
            barrier.wait(30)                      # all start migrating at once
            await s.init()
            out.put(("ok", await s.ping()))
        finally:
            await s.close()
    try:
        asyncio.run(go())
    except BaseException as e:               # noqa: BLE001 (the parent reports it)
        out.put(("error", repr(e)))


def _race(url: str) -> list[tuple]:
    ctx = mp.get_context("spawn")             # a clean interpreter each, as uvicorn's workers are
    barrier, out = ctx.Barrier(PROCS), ctx.Queue()
    ps = [ctx.Process(target=_migrate, args=(url, barrier, out)) for _ in range(PROCS)]
    for p in ps:
        p.start()
    got = [out.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(30)
    return got


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_first_start_migrates_once(backend, tmp_path, request):
    url = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'race.db'}"
    for attempt in range(3):                  # the window is narrow: try it a few times on fresh stores
        if backend == "sqlite":        # in a folder not made yet, as a first `cborg serve`'s CBORG_HOME
            url = f"sqlite:///{tmp_path / f'home{attempt}' / 'race.db'}"
        got = _race(url)
        assert got == [("ok", True)] * PROCS, got
        if backend == "postgres":
            break

    async def version():
        s = open_store(url)
        await s.init()
        try:
            if backend == "sqlite":
                return await s._run(lambda db: db.execute("SELECT version FROM schema_version").fetchall())
            async with s.pool.acquire() as c:
                return [tuple(r) for r in await c.fetch("SELECT version FROM schema_version")]
        finally:
            await s.close()
    from router.store.postgres import MIGRATIONS as PG
    from router.store.sqlite import MIGRATIONS as LITE
    rows = asyncio.run(version())
    assert [tuple(r) for r in rows] == [(len(PG if backend == "postgres" else LITE),)]   # one row, latest
