"""SQLite store: the embedded default. All SQLite calls run on one worker thread, never on the event loop."""
from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from typing import Any, Callable

import orjson

from ..accounting.ledger import LEDGER_COLUMNS, daily_totals
from ..limits.budget import roll
from .base import (KEY_FIELDS, DaySpend, KeyRecord, ResponseRecord, UserRecord, UserSummary, key_from_row,
                   key_to_row, prefix_range, user_from_row, user_update_values)

# Each entry is one schema version; a database is brought forward from the version it records.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        key_hint TEXT NOT NULL,
        user_id TEXT NOT NULL,
        alias TEXT,
        models TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL,
        blocked INTEGER NOT NULL DEFAULT 0,
        revoked_at REAL,
        max_parallel INTEGER,
        rpm INTEGER,
        tpm INTEGER,
        max_budget REAL,
        budget_period TEXT,
        spend REAL NOT NULL DEFAULT 0,
        budget_reset_at REAL,
        metadata TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX keys_updated ON keys(updated_at);
    CREATE INDEX keys_user ON keys(user_id);
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        max_budget REAL,
        budget_period TEXT,
        spend REAL NOT NULL DEFAULT 0,
        budget_reset_at REAL,
        created_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        ts REAL NOT NULL,
        key_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        served_model TEXT NOT NULL,
        provider TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost REAL NOT NULL,
        status INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        stream INTEGER NOT NULL,
        estimated INTEGER NOT NULL
    );
    CREATE INDEX ledger_ts ON ledger(ts);
    CREATE INDEX ledger_key ON ledger(key_id, ts);
    CREATE INDEX ledger_user ON ledger(user_id, ts);
    """,
    # Every index is written on the gateway's own core for every row: keep the one per-key
    # queries use. A user's rows are their keys' rows (a key belongs to one user for life); rows
    # are in time order by id. scripts/bench_instructions, writer thread: 22.9k -> 16.9k instructions a row.
    """
    DROP INDEX IF EXISTS ledger_ts;
    DROP INDEX IF EXISTS ledger_user;
    """,
    # Per-user limits (overrides of models.yaml's limits.user), and when an admin last set them.
    """
    ALTER TABLE users ADD COLUMN max_parallel INTEGER;
    ALTER TABLE users ADD COLUMN rpm INTEGER;
    ALTER TABLE users ADD COLUMN tpm INTEGER;
    ALTER TABLE users ADD COLUMN updated_at REAL NOT NULL DEFAULT 0;
    CREATE INDEX users_updated ON users(updated_at);
    """,
    # The endpoint of each ledger row (chat/completions, messages, responses, ...; NULL before), and the
    # Responses API's stored responses (previous_response_id, GET/DELETE /v1/responses/{id}).
    """
    ALTER TABLE ledger ADD COLUMN endpoint TEXT;
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        model TEXT NOT NULL,
        native INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX responses_created ON responses(created_at);
    """,
    # The Key Manager's pages: spend per user, UTC day, key and model, added to in the ledger
    # flush's transaction (from the ledger's existing rows here, once), so that no page scans the
    # ledger; the admin's key list newest first a page at a time, and found by alias.
    """
    CREATE TABLE spend_daily (
        user_id TEXT NOT NULL,
        day INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost REAL NOT NULL,
        PRIMARY KEY (user_id, day, key_id, model)
    ) WITHOUT ROWID;
    INSERT INTO spend_daily
        SELECT user_id, CAST(ts / 86400 AS INTEGER), key_id, model, COUNT(*), SUM(prompt_tokens),
               SUM(completion_tokens), SUM(cost)
        FROM ledger GROUP BY 1, 2, 3, 4;
    CREATE INDEX keys_created ON keys(created_at, id);
    CREATE INDEX keys_alias ON keys(alias);
    """,
]


def sqlite_path(url: str) -> str:
    """sqlite:///relative.db, sqlite:////abs/path.db, or a plain path."""
    if url.startswith("sqlite://"):
        url = url[len("sqlite://"):]
        if url.startswith("/"):
            url = url[1:] if not url.startswith("//") else url[1:]
    return url or "cborg.db"


_ADD_DAILY = ("INSERT INTO spend_daily VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (user_id, day, key_id, model) DO UPDATE "
              "SET requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
              "completion_tokens = completion_tokens + excluded.completion_tokens, cost = cost + excluded.cost")

# Rows go in as multi-row INSERTs of a few fixed sizes (64, then 32, 16, ... 1 for the rest):
# - fixed sizes, so that sqlite3's statement cache parses each text once: a statement sized to
#   each batch had to be parsed every flush, and parsing thousands of rows cost more than writing
#   them (callgrind on the in-process gateway: 36k of 65k instructions a row went to the parser);
# - many rows a statement, because the sqlite3 module releases the GIL around each statement's
#   step: one step a row (executemany) hands the GIL to and from the busy event loop at every row.
#   scripts/bench_gateway, one session: accounting on / off 0.75 with executemany, 0.88 with these.
_ROW = "(" + ",".join("?" * len(LEDGER_COLUMNS)) + ")"
_INSERT = {n: f"INSERT INTO ledger ({','.join(LEDGER_COLUMNS)}) VALUES " + ",".join([_ROW] * n)
           for n in (64, 32, 16, 8, 4, 2, 1)}


def insert_rows(db: sqlite3.Connection, rows: list[tuple]) -> None:
    i, n = 0, len(rows)
    for size, sql in _INSERT.items():
        while n - i >= size:
            db.execute(sql, list(chain.from_iterable(rows[i:i + size])))
            i += size          # (below 64, each size fits at most once: the rest is under twice it)


class SQLiteStore:
    def __init__(self, url: str):
        self.path = sqlite_path(url)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cborg-sqlite")
        self._db: sqlite3.Connection | None = None

    # -- plumbing
    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._db is None:
            self._db = self._connect()
        return fn(self._db)

    def _connect(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _first_open(self) -> None:
        """Connect and migrate holding a lock file beside the database: processes starting together
        on a fresh file (`--workers N`) take turns. Switching a new file to WAL needs it alone, and
        SQLite answers "database is locked" at once there instead of waiting (seen with six at once)."""
        path = os.path.abspath(self.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)     # (a new CBORG_HOME)
        with open(path + ".init-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._db is None:
                    self._db = self._connect()
                self._migrate(self._db, MIGRATIONS)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _migrate(db: sqlite3.Connection, migrations: list[str]) -> None:
        """One write transaction from reading the version to the last step: workers and replicas
        starting together on a fresh file wait for each other instead of both creating its tables."""
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            have = row[0] if row else 0
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
            for v in range(have, len(migrations)):
                for stmt in [s for s in migrations[v].split(";") if s.strip()]:
                    db.execute(stmt)
                db.execute("UPDATE schema_version SET version = ?", (v + 1,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def init(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._first_open)

    async def close(self) -> None:
        def _close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None
        if self._db is not None:
            await self._run(_close)
        self._pool.shutdown(wait=True)

    async def ping(self) -> bool:
        try:
            return await self._run(lambda db: db.execute("SELECT 1").fetchone()[0] == 1)
        except sqlite3.Error:
            return False

    # -- keys
    async def create_key(self, key: KeyRecord) -> None:
        row = key_to_row(key)
        cols = ",".join(KEY_FIELDS)
        marks = ",".join("?" for _ in KEY_FIELDS)
        await self._run(lambda db: db.execute(f"INSERT INTO keys ({cols}) VALUES ({marks})",
                                              [row[c] for c in KEY_FIELDS]))

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        row = await self._run(lambda db: db.execute("SELECT * FROM keys WHERE key_hash = ?",
                                                    (key_hash,)).fetchone())
        return key_from_row(dict(row)) if row else None

    async def find_key(self, id_or_hash: str) -> KeyRecord | None:
        row = await self._run(lambda db: db.execute(
            "SELECT * FROM keys WHERE id = ? OR key_hash = ? OR alias = ? "
            "ORDER BY id = ? DESC, key_hash = ? DESC, created_at DESC",      # an id or hash before any alias
            (id_or_hash,) * 5).fetchone())
        return key_from_row(dict(row)) if row else None

    async def list_keys(self, user_id: str | None = None) -> list[KeyRecord]:
        def q(db: sqlite3.Connection):
            if user_id is None:
                return db.execute("SELECT * FROM keys ORDER BY created_at").fetchall()
            return db.execute("SELECT * FROM keys WHERE user_id = ? ORDER BY created_at", (user_id,)).fetchall()
        return [key_from_row(dict(r)) for r in await self._run(q)]

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        bad = set(changes) - set(KEY_FIELDS) - {"updated_at"}
        if bad or "id" in changes or "key_hash" in changes:
            raise ValueError(f"cannot update fields {sorted(bad | ({'id', 'key_hash'} & set(changes)))}")
        vals = {k: orjson.dumps(v).decode() if k in ("models", "metadata") else v for k, v in changes.items()}
        vals["updated_at"] = time.time()
        sets = ",".join(f"{k} = ?" for k in vals)

        def q(db: sqlite3.Connection):
            db.execute(f"UPDATE keys SET {sets} WHERE id = ?", [*vals.values(), key_id])
            return db.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        row = await self._run(q)
        return key_from_row(dict(row)) if row else None

    async def keys_changed_since(self, ts: float) -> list[KeyRecord]:
        rows = await self._run(lambda db: db.execute("SELECT * FROM keys WHERE updated_at >= ?", (ts,)).fetchall())
        return [key_from_row(dict(r)) for r in rows]

    # -- users
    async def get_user(self, user_id: str) -> UserRecord | None:
        row = await self._run(lambda db: db.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone())
        return user_from_row(dict(row)) if row else None

    async def update_user(self, user_id: str, changes: dict[str, Any]) -> UserRecord:
        vals = user_update_values(changes)
        now = vals["updated_at"]
        sets = ",".join(f"{k} = excluded.{k}" for k in vals)

        def tx(db: sqlite3.Connection):
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"INSERT INTO users (user_id, created_at, {','.join(vals)}) "
                           f"VALUES (?, ?, {','.join('?' * len(vals))}) ON CONFLICT(user_id) DO UPDATE SET {sets}",
                           (user_id, now, *vals.values()))
                db.execute("UPDATE keys SET updated_at = ? WHERE user_id = ?", (now, user_id))
                row = db.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone()
                db.execute("COMMIT")
                return row
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return user_from_row(dict(await self._run(tx)))

    async def users_changed_since(self, ts: float) -> list[UserRecord]:
        rows = await self._run(lambda db: db.execute(
            "SELECT * FROM users WHERE updated_at >= ? AND updated_at > 0", (ts,)).fetchall())
        return [user_from_row(dict(r)) for r in rows]

    # -- the Key Manager's lists and aggregates
    async def search_keys(self, text: str | None, before: tuple[float, str] | None, limit: int) -> list[KeyRecord]:
        where, args = [], []
        if text:
            lo, hi = prefix_range(text)
            # Each term has its index (SQLite's OR optimization reads their union, then sorts it).
            where.append("(id = ? OR key_hash = ? OR (user_id >= ? AND user_id < ?) OR (alias >= ? AND alias < ?))")
            args += [text, text, lo, hi, lo, hi]
        if before is not None:
            where.append("(created_at, id) < (?, ?)")
            args += list(before)
        sql = ("SELECT * FROM keys" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created_at DESC, id DESC LIMIT ?")
        rows = await self._run(lambda db: db.execute(sql, [*args, limit]).fetchall())
        return [key_from_row(dict(r)) for r in rows]

    async def count_keys(self) -> int:
        return (await self._run(lambda db: db.execute("SELECT COUNT(*) FROM keys").fetchone()))[0]

    async def list_users(self, prefix: str, after: str, limit: int) -> list[UserSummary]:
        lo, hi = prefix_range(prefix)

        def q(db: sqlite3.Connection) -> list[UserSummary]:
            # Both lists walk their index in order and stop at `limit`.
            ids = {r[0] for r in db.execute(
                "SELECT DISTINCT user_id FROM keys WHERE user_id > ? AND user_id >= ? AND user_id < ? "
                "ORDER BY user_id LIMIT ?", (after, lo, hi, limit))}
            ids.update(r[0] for r in db.execute(
                "SELECT user_id FROM users WHERE user_id > ? AND user_id >= ? AND user_id < ? "
                "ORDER BY user_id LIMIT ?", (after, lo, hi, limit)))
            page = sorted(ids)[:limit]
            marks = ",".join("?" * len(page))
            users = {r["user_id"]: user_from_row(dict(r))
                     for r in db.execute(f"SELECT * FROM users WHERE user_id IN ({marks})", page)}
            counts = {r[0]: (r[1], r[2]) for r in db.execute(
                f"SELECT user_id, COUNT(*), SUM(revoked_at IS NULL) FROM keys WHERE user_id IN ({marks}) "
                "GROUP BY user_id", page)}
            return [UserSummary(u, users.get(u), *counts.get(u, (0, 0))) for u in page]
        return await self._run(q)

    async def daily_spend(self, user_id: str, since_day: int) -> list[DaySpend]:
        rows = await self._run(lambda db: db.execute(
            "SELECT day, key_id, model, requests, cost FROM spend_daily WHERE user_id = ? AND day >= ?",
            (user_id, since_day)).fetchall())
        return [DaySpend(*r) for r in rows]

    async def users_spend_since(self, user_ids: list[str], since_day: int) -> dict[str, float]:
        def q(db: sqlite3.Connection) -> dict[str, float]:
            out: dict[str, float] = {}
            for i in range(0, len(user_ids), 500):      # (SQLite's limit on bound parameters)
                part = user_ids[i:i + 500]
                out.update(db.execute(f"SELECT user_id, SUM(cost) FROM spend_daily WHERE user_id IN "
                                      f"({','.join('?' * len(part))}) AND day >= ? GROUP BY user_id",
                                      [*part, since_day]).fetchall())
            return out
        return await self._run(q)

    # -- ledger and spend
    async def spends(self, key_ids: list[str], user_ids: list[str]) -> dict[str, tuple[float, float | None]]:
        def q(db: sqlite3.Connection) -> dict[str, tuple[float, float | None]]:
            out: dict[str, tuple[float, float | None]] = {}
            for table, col, prefix, ids in (("keys", "id", "k:", key_ids), ("users", "user_id", "u:", user_ids)):
                for i in range(0, len(ids), 500):      # (SQLite's limit on bound parameters)
                    part = ids[i:i + 500]
                    for r in db.execute(f"SELECT {col}, spend, budget_reset_at FROM {table} "
                                        f"WHERE {col} IN ({','.join('?' * len(part))})", part):
                        out[prefix + r[0]] = (r[1], r[2])
            return out
        return await self._run(q)

    async def write_ledger(self, rows: list[tuple], keys: dict, users: dict, now: float) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                insert_rows(db, rows)
                db.executemany(_ADD_DAILY, daily_totals(rows))
                for key_id, d in keys.items():
                    r = db.execute("SELECT spend, budget_reset_at FROM keys WHERE id = ?", (key_id,)).fetchone()
                    if r is not None:
                        spend, reset_at = roll(r[0], r[1], d.period_s, now)
                        db.execute("UPDATE keys SET spend = ?, budget_reset_at = ? WHERE id = ?",
                                   (spend + d.delta, reset_at, key_id))
                for user_id, d in users.items():
                    r = db.execute("SELECT spend, budget_reset_at FROM users WHERE user_id = ?", (user_id,)).fetchone()
                    spend, reset_at = roll(r[0], r[1], d.period_s, now) if r else roll(0.0, None, d.period_s, now)
                    if r is None:
                        db.execute("INSERT INTO users (user_id, spend, budget_reset_at, created_at) VALUES (?,?,?,?)",
                                   (user_id, spend + d.delta, reset_at, now))
                    else:
                        db.execute("UPDATE users SET spend = ?, budget_reset_at = ? WHERE user_id = ?",
                                   (spend + d.delta, reset_at, user_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        await self._run(tx)

    # -- stored responses (Responses API)
    async def put_responses(self, recs: list[ResponseRecord]) -> None:
        def tx(db: sqlite3.Connection) -> None:
            rows = [(r.id, r.key_id, r.created_at, r.model, 1 if r.native else 0, r.text()) for r in recs]
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO responses (id, key_id, created_at, model, native, data) "
                               "VALUES (?,?,?,?,?,?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        await self._run(tx)

    async def get_response(self, response_id: str) -> ResponseRecord | None:
        r = await self._run(lambda db: db.execute("SELECT * FROM responses WHERE id = ?", (response_id,)).fetchone())
        return ResponseRecord(r["id"], r["key_id"], r["model"], bool(r["native"]), r["data"],
                              r["created_at"]) if r else None

    async def delete_response(self, response_id: str) -> bool:
        return await self._run(lambda db: db.execute("DELETE FROM responses WHERE id = ?",
                                                     (response_id,)).rowcount) > 0

    async def purge_responses(self, before: float) -> int:
        return await self._run(lambda db: db.execute("DELETE FROM responses WHERE created_at < ?",
                                                     (before,)).rowcount)

    async def ledger_totals(self, key_id: str | None = None) -> tuple[int, float]:
        def q(db: sqlite3.Connection):
            if key_id is None:
                return db.execute("SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM ledger").fetchone()
            return db.execute("SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM ledger WHERE key_id = ?",
                              (key_id,)).fetchone()
        r = await self._run(q)
        return int(r[0]), float(r[1])

    async def ledger_rows(self, key_id: str | None = None, limit: int = 1000) -> list[dict]:
        def q(db: sqlite3.Connection):
            if key_id is None:
                return db.execute("SELECT * FROM ledger ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            return db.execute("SELECT * FROM ledger WHERE key_id = ? ORDER BY id DESC LIMIT ?",
                              (key_id, limit)).fetchall()
        return [dict(r) for r in await self._run(q)]
