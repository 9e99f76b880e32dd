"""What the Key Manager's pages read, on both stores: the daily spend aggregate (written in the
ledger flush's transaction, filled from the existing ledger by its migration) and the paginated key
and user lists, checked against the same answers computed from all the rows."""
from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from router.accounting.ledger import LEDGER_COLUMNS, spend_deltas
from router.store import open_store
from router.store.base import KeyRecord

DAY = 86400
T0 = 1_790_000_000.0        # a fixed moment: days do not depend on when the test runs
OWNER = {"k1": "ann@lbl.gov", "k2": "ann@lbl.gov", "k3": "ben@lbl.gov"}
MODELS = ("openai/gpt-4o", "anthropic/claude-haiku", "lbl/llama")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    return request.getfixturevalue("pg_url") if request.param == "postgres" else f"sqlite:///{tmp_path / 's.db'}"


@pytest.fixture
async def store(store_url):
    s = open_store(store_url)
    await s.init()
    yield s
    await s.close()


def row(i: int, ts: float, key: str, model: str, cost: float) -> tuple:
    return (f"req-{i}", ts, key, OWNER[key], model, model, "openai", 10, 0, 5, cost, 200, 12.0, 12.0, 0, 0,
            "chat/completions")


def sample_rows(n: int, start: int = 0, seed: int = 1) -> list[tuple]:
    """Rows over three days (UTC day boundaries included), three keys of two users, three models."""
    rnd = random.Random(seed)
    return [row(start + i, T0 - rnd.uniform(0, 3 * DAY), rnd.choice(list(OWNER)), rnd.choice(MODELS),
                rnd.choice([0.0, 0.001, 0.25, 1e-7])) for i in range(n)]


async def write(store, rows: list[tuple]) -> None:
    keys, users = spend_deltas(rows, {})
    await store.write_ledger(rows, keys, users, time.time())


def summed(rows: list[tuple], user: str, since: int) -> dict:
    """The aggregate computed from the ledger's rows: (day, key, model) -> [requests, cost]."""
    out: dict = {}
    for r in rows:
        d = int(r[1] // DAY)
        if r[3] == user and d >= since:
            a = out.setdefault((d, r[2], r[4]), [0, 0.0])
            a[0] += 1
            a[1] += r[10]
    return out


def as_dict(days) -> dict:
    return {(d.day, d.key_id, d.model): [d.requests, d.cost] for d in days}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and abs(a[k][1] - b[k][1]) < 1e-9 for k in a)


async def test_daily_aggregate_follows_the_ledger(store):
    rows = sample_rows(300)
    for i in range(0, 300, 70):                     # several flushes, some adding to the same days
        await write(store, rows[i:i + 70])
    first = int(T0 // DAY) - 3
    for user in ("ann@lbl.gov", "ben@lbl.gov"):
        assert same(as_dict(await store.daily_spend(user, first)), summed(rows, user, first))
        assert same(as_dict(await store.daily_spend(user, first + 2)), summed(rows, user, first + 2))
    totals = await store.users_spend_since(["ann@lbl.gov", "ben@lbl.gov", "nobody@lbl.gov"], first)
    for user in ("ann@lbl.gov", "ben@lbl.gov"):
        assert totals[user] == pytest.approx(sum(r[10] for r in rows if r[3] == user))
    assert "nobody@lbl.gov" not in totals
    assert await store.daily_spend("nobody@lbl.gov", first) == []


async def test_a_flush_that_fails_adds_nothing_to_the_aggregate(store):
    """The aggregate moves with the rows or not at all: a batch the database refuses (a NULL in a
    NOT NULL column here) leaves both as they were."""
    good = sample_rows(20)
    await write(store, good)
    bad = sample_rows(20, start=100, seed=2)
    bad[7] = (*bad[7][:4], None, *bad[7][5:])       # model NULL
    with pytest.raises(Exception):
        await write(store, bad)
    first = int(T0 // DAY) - 3
    assert same(as_dict(await store.daily_spend("ann@lbl.gov", first)), summed(good, "ann@lbl.gov", first))
    assert (await store.ledger_totals())[0] == 20


async def test_the_migration_fills_the_aggregate_from_the_existing_ledger(store_url, monkeypatch):
    url = store_url
    backend = "postgres" if url.startswith("postgres") else "sqlite"
    if backend == "postgres":
        from router.store import postgres as mod
    else:
        from router.store import sqlite as mod
    full = list(mod.MIGRATIONS)
    at = next(i for i, m in enumerate(full) if "spend_daily" in m)
    rows = sample_rows(200)
    monkeypatch.setattr(mod, "MIGRATIONS", full[:at])        # a database from before the aggregate
    old = open_store(url)
    await old.init()
    if backend == "postgres":                                 # its ledger, as the old flush wrote it
        await old.pool.copy_records_to_table("ledger", records=[(*r[:14], bool(r[14]), bool(r[15]), *r[16:]) for r in rows],
                                             columns=list(LEDGER_COLUMNS))
    else:
        await old._run(lambda db: mod.insert_rows(db, rows))
    await old.close()
    monkeypatch.undo()
    new = open_store(url)
    await new.init()                                          # brings it forward
    try:
        first = int(T0 // DAY) - 3
        for user in ("ann@lbl.gov", "ben@lbl.gov"):
            assert same(as_dict(await new.daily_spend(user, first)), summed(rows, user, first))
        await write(new, rows[:10])                           # and it goes on from there
        assert same(as_dict(await new.daily_spend("ben@lbl.gov", first)),
                    summed(rows + rows[:10], "ben@lbl.gov", first))
    finally:
        await new.close()


# -- keys and users, a page at a time ------------------------------------------------------------
NAMES = ["ann@lbl.gov", "Ann@lbl.gov", "anna@lbl.gov", "ben@lbl.gov", "béa@lbl.gov", "a%b@lbl.gov", "a_b@lbl.gov",
         "zoë@lbl.gov", "ann"]
ALIASES = [None, "ann-laptop", "pipeline", "pipe%", "", "notebook", "ännchen", "ann"]


async def make_keys(store, n: int, seed: int = 3) -> list[KeyRecord]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        # a few share a creation time: pages must split ties by id
        k = KeyRecord(id=f"key-{i:04x}{rnd.randrange(16**4):04x}", key_hash=f"h{i:063x}", key_hint="sk-...abcd",
                      user_id=rnd.choice(NAMES), alias=rnd.choice(ALIASES), created_at=T0 + (i // 3),
                      revoked_at=T0 if i % 7 == 0 else None)
        await store.create_key(k)
        out.append(k)
    return out


def newest_first(keys: list[KeyRecord]) -> list[str]:
    return [k.id for k in sorted(keys, key=lambda k: (k.created_at, k.id), reverse=True)]


def matches(k: KeyRecord, text: str) -> bool:
    return text in (k.id, k.key_hash) or k.user_id.startswith(text) or (k.alias or "\0").startswith(text)


async def all_pages(store, text: str | None, size: int) -> list[str]:
    seen, before = [], None
    while True:
        page = await store.search_keys(text, before, size)
        seen += [k.id for k in page]
        if len(page) < size:
            return seen
        before = (page[-1].created_at, page[-1].id)


async def test_key_pages_cover_every_key_once_newest_first(store):
    keys = await make_keys(store, 130)
    assert await all_pages(store, None, 25) == newest_first(keys)
    assert await store.count_keys() == 130
    for text in ("ann", "Ann", "a%", "a_", "pipe", "pipe%", "béa", "ännchen", keys[5].id, keys[9].key_hash, "zz"):
        assert await all_pages(store, text, 7) == newest_first([k for k in keys if matches(k, text)]), text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("anbé%_@.ä\\'\"zA"), min_size=1, max_size=5))
async def test_key_search_is_a_prefix_search_whatever_the_text(tmp_path_factory, text):
    """Wildcards, quotes, backslashes and non-ASCII letters are text: a prefix, never a pattern."""
    s = open_store(f"sqlite:///{tmp_path_factory.mktemp('h') / 's.db'}")
    await s.init()
    try:
        keys = await make_keys(s, 40, seed=len(text))
        assert await all_pages(s, text, 9) == newest_first([k for k in keys if matches(k, text)])
    finally:
        await s.close()


async def test_user_pages(store):
    keys = await make_keys(store, 60)
    await store.update_user("carol@lbl.gov", {"max_budget": 5.0})          # a user with no key
    everyone = sorted({k.user_id for k in keys} | {"carol@lbl.gov"})
    seen, after = [], ""
    while True:
        page = await store.list_users("", after, 3)
        seen += page
        if len(page) < 3:
            break
        after = page[-1].user_id
    assert [u.user_id for u in seen] == everyone
    for u in seen:
        mine = [k for k in keys if k.user_id == u.user_id]
        assert (u.keys, u.active_keys) == (len(mine), sum(k.revoked_at is None for k in mine))
        assert (u.user is not None and u.user.max_budget == 5.0) == (u.user_id == "carol@lbl.gov")
    for prefix in ("ann", "a%", "a_", "c", "zz"):
        page = await store.list_users(prefix, "", 50)
        assert [u.user_id for u in page] == [u for u in everyone if u.startswith(prefix)], prefix
