"""PostgreSQL store (asyncpg): keys, users and the ledger shared by several gateway replicas.

CBORG_DATABASE_URL=postgresql://user@host:5432/db; extra query parameters become server settings
(e.g. ?search_path=cborg). Migrations run at start-up under an advisory lock, so replicas starting
together do not race.
"""
from __future__ import annotations

import time
from typing import Any

import asyncpg
import orjson

from ..accounting.ledger import LEDGER_COLUMNS, daily_totals
from ..limits.budget import roll
from .base import (KEY_FIELDS, DaySpend, KeyRecord, ResponseRecord, UserRecord, UserSummary, key_from_row,
                   key_to_row, prefix_range, user_from_row, user_update_values)

MIGRATIONS: list[str] = [
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        key_hint TEXT NOT NULL,
        user_id TEXT NOT NULL,
        alias TEXT,
        models TEXT NOT NULL DEFAULT '[]',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        blocked BOOLEAN NOT NULL DEFAULT FALSE,
        revoked_at DOUBLE PRECISION,
        max_parallel BIGINT,
        rpm BIGINT,
        tpm BIGINT,
        max_budget DOUBLE PRECISION,
        budget_period TEXT,
        spend DOUBLE PRECISION NOT NULL DEFAULT 0,
        budget_reset_at DOUBLE PRECISION,
        metadata TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX keys_updated ON keys(updated_at);
    CREATE INDEX keys_user ON keys(user_id);
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        max_budget DOUBLE PRECISION,
        budget_period TEXT,
        spend DOUBLE PRECISION NOT NULL DEFAULT 0,
        budget_reset_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    """
    CREATE TABLE ledger (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        key_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        served_model TEXT NOT NULL,
        provider TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost DOUBLE PRECISION NOT NULL,
        status INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        stream BOOLEAN NOT NULL,
        estimated BOOLEAN NOT NULL
    );
    CREATE INDEX ledger_ts ON ledger(ts);
    CREATE INDEX ledger_key ON ledger(key_id, ts);
    CREATE INDEX ledger_user ON ledger(user_id, ts);
    """,
    # Per-user limits (overrides of models.yaml's limits.user), and when an admin last set them.
    """
    ALTER TABLE users ADD COLUMN max_parallel BIGINT;
    ALTER TABLE users ADD COLUMN rpm BIGINT;
    ALTER TABLE users ADD COLUMN tpm BIGINT;
    ALTER TABLE users ADD COLUMN updated_at DOUBLE PRECISION NOT NULL DEFAULT 0;
    CREATE INDEX users_updated ON users(updated_at);
    """,
    # The endpoint of each ledger row (chat/completions, messages, responses, ...; NULL before), and the
    # Responses API's stored responses (previous_response_id, GET/DELETE /v1/responses/{id}).
    """
    ALTER TABLE ledger ADD COLUMN endpoint TEXT;
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        model TEXT NOT NULL,
        native BOOLEAN NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX responses_created ON responses(created_at);
    """,
    # The Key Manager's pages: spend per user, UTC day, key and model, added to in the ledger
    # flush's transaction (from the ledger's existing rows here, once), so that no page scans the
    # ledger; the admin's key list newest first a page at a time, and found by owner or alias
    # prefix (COLLATE "C": ranges in code-point order, whatever the database's collation).
    """
    CREATE TABLE spend_daily (
        user_id TEXT NOT NULL,
        day INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        requests BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (user_id, day, key_id, model)
    );
    INSERT INTO spend_daily
        SELECT user_id, FLOOR(ts / 86400)::INTEGER, key_id, model, COUNT(*), SUM(prompt_tokens),
               SUM(completion_tokens), SUM(cost)
        FROM ledger GROUP BY 1, 2, 3, 4;
    CREATE INDEX keys_created ON keys(created_at, id);
    CREATE INDEX keys_alias ON keys((alias COLLATE "C"));
    CREATE INDEX keys_user_c ON keys((user_id COLLATE "C"));
    CREATE INDEX users_c ON users((user_id COLLATE "C"));
    """,
]

_ADD_DAILY = ("INSERT INTO spend_daily VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
              "ON CONFLICT (user_id, day, key_id, model) DO UPDATE SET "
              "requests = spend_daily.requests + EXCLUDED.requests, "
              "prompt_tokens = spend_daily.prompt_tokens + EXCLUDED.prompt_tokens, "
              "completion_tokens = spend_daily.completion_tokens + EXCLUDED.completion_tokens, "
              "cost = spend_daily.cost + EXCLUDED.cost")

_LOCK_ID = 0x6362_6f72  # "cbor": serializes migrations across replicas


class PostgresStore:
    def __init__(self, url: str, min_size: int = 1, max_size: int = 8):
        self.url = url
        self._min, self._max = min_size, max_size
        self.pool: asyncpg.Pool | None = None

    async def init(self) -> None:
        self.pool = await asyncpg.create_pool(self.url, min_size=self._min, max_size=self._max)
        async with self.pool.acquire() as c:
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
                await c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                have = await c.fetchval("SELECT version FROM schema_version")
                if have is None:
                    await c.execute("INSERT INTO schema_version VALUES (0)")
                    have = 0
                for v in range(have, len(MIGRATIONS)):
                    await c.execute(MIGRATIONS[v])
                    await c.execute("UPDATE schema_version SET version = $1", v + 1)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def ping(self) -> bool:
        try:
            return await self.pool.fetchval("SELECT 1") == 1
        except Exception:  # noqa: BLE001
            return False

    # -- keys
    async def create_key(self, key: KeyRecord) -> None:
        row = key_to_row(key)
        cols = ",".join(KEY_FIELDS)
        marks = ",".join(f"${i + 1}" for i in range(len(KEY_FIELDS)))
        await self.pool.execute(f"INSERT INTO keys ({cols}) VALUES ({marks})", *[row[c] for c in KEY_FIELDS])

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        r = await self.pool.fetchrow("SELECT * FROM keys WHERE key_hash = $1", key_hash)
        return key_from_row(dict(r)) if r else None

    async def find_key(self, id_or_hash: str) -> KeyRecord | None:
        r = await self.pool.fetchrow("SELECT * FROM keys WHERE id = $1 OR key_hash = $1 OR alias = $1 "
                                     "ORDER BY id = $1 DESC, key_hash = $1 DESC, created_at DESC LIMIT 1",
                                     id_or_hash)    # an id or hash before any alias
        return key_from_row(dict(r)) if r else None

    async def list_keys(self, user_id: str | None = None) -> list[KeyRecord]:
        if user_id is None:
            rows = await self.pool.fetch("SELECT * FROM keys ORDER BY created_at")
        else:
            rows = await self.pool.fetch("SELECT * FROM keys WHERE user_id = $1 ORDER BY created_at", user_id)
        return [key_from_row(dict(r)) for r in rows]

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        bad = set(changes) - set(KEY_FIELDS)
        if bad or "id" in changes or "key_hash" in changes:
            raise ValueError(f"cannot update fields {sorted(bad | ({'id', 'key_hash'} & set(changes)))}")
        vals = {k: orjson.dumps(v).decode() if k in ("models", "metadata") else v for k, v in changes.items()}
        vals["updated_at"] = time.time()
        sets = ",".join(f"{k} = ${i + 2}" for i, k in enumerate(vals))
        r = await self.pool.fetchrow(f"UPDATE keys SET {sets} WHERE id = $1 RETURNING *", key_id, *vals.values())
        return key_from_row(dict(r)) if r else None

    async def keys_changed_since(self, ts: float) -> list[KeyRecord]:
        rows = await self.pool.fetch("SELECT * FROM keys WHERE updated_at >= $1", ts)
        return [key_from_row(dict(r)) for r in rows]

    # -- users
    async def get_user(self, user_id: str) -> UserRecord | None:
        r = await self.pool.fetchrow("SELECT * FROM users WHERE user_id = $1", user_id)
        return user_from_row(dict(r)) if r else None

    async def update_user(self, user_id: str, changes: dict[str, Any]) -> UserRecord:
        vals = user_update_values(changes)
        now = vals["updated_at"]
        cols = ",".join(vals)
        marks = ",".join(f"${i + 3}" for i in range(len(vals)))
        sets = ",".join(f"{k} = EXCLUDED.{k}" for k in vals)
        async with self.pool.acquire() as c:
            async with c.transaction():
                r = await c.fetchrow(f"INSERT INTO users (user_id, created_at, {cols}) VALUES ($1, $2, {marks}) "
                                     f"ON CONFLICT (user_id) DO UPDATE SET {sets} RETURNING *",
                                     user_id, now, *vals.values())
                await c.execute("UPDATE keys SET updated_at = $1 WHERE user_id = $2", now, user_id)
        return user_from_row(dict(r))

    async def users_changed_since(self, ts: float) -> list[UserRecord]:
        rows = await self.pool.fetch("SELECT * FROM users WHERE updated_at >= $1 AND updated_at > 0", ts)
        return [user_from_row(dict(r)) for r in rows]

    # -- the Key Manager's lists and aggregates
    async def search_keys(self, text: str | None, before: tuple[float, str] | None, limit: int) -> list[KeyRecord]:
        where, args = [], []
        if text:
            lo, hi = prefix_range(text)
            where.append('(id = $1 OR key_hash = $1 OR (user_id COLLATE "C" >= $2 AND user_id COLLATE "C" < $3) '
                         'OR (alias COLLATE "C" >= $2 AND alias COLLATE "C" < $3))')
            args += [text, lo, hi]
        if before is not None:
            where.append(f"(created_at, id) < (${len(args) + 1}, ${len(args) + 2})")
            args += list(before)
        sql = ("SELECT * FROM keys" + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY created_at DESC, id DESC LIMIT ${len(args) + 1}")
        async with self.pool.acquire() as c:
            async with c.transaction():
                # A plan for these values: the generic plan of the prepared statement cannot tell a
                # search matching one key from one matching 30,000, and walks the whole created_at
                # index for the former (440 ms at 100,000 keys; 0.3 ms with the indexes it names).
                await c.execute("SET LOCAL plan_cache_mode = force_custom_plan")
                rows = await c.fetch(sql, *args, limit)
        return [key_from_row(dict(r)) for r in rows]

    async def count_keys(self) -> int:
        return await self.pool.fetchval("SELECT COUNT(*) FROM keys")

    async def list_users(self, prefix: str, after: str, limit: int) -> list[UserSummary]:
        lo, hi = prefix_range(prefix)
        rng = 'user_id COLLATE "C" > $1 AND user_id COLLATE "C" >= $2 AND user_id COLLATE "C" < $3'
        ids = {r[0] for r in await self.pool.fetch(
            f'SELECT DISTINCT user_id COLLATE "C" FROM keys WHERE {rng} ORDER BY 1 LIMIT $4', after, lo, hi, limit)}
        ids.update(r[0] for r in await self.pool.fetch(
            f'SELECT user_id COLLATE "C" FROM users WHERE {rng} ORDER BY 1 LIMIT $4', after, lo, hi, limit))
        page = sorted(ids)[:limit]
        users = {r["user_id"]: user_from_row(dict(r))
                 for r in await self.pool.fetch("SELECT * FROM users WHERE user_id = ANY($1::text[])", page)}
        counts = {r[0]: (r[1], r[2]) for r in await self.pool.fetch(
            "SELECT user_id, COUNT(*), COUNT(*) FILTER (WHERE revoked_at IS NULL) FROM keys "
            "WHERE user_id = ANY($1::text[]) GROUP BY user_id", page)}
        return [UserSummary(u, users.get(u), *counts.get(u, (0, 0))) for u in page]

    async def daily_spend(self, user_id: str, since_day: int) -> list[DaySpend]:
        rows = await self.pool.fetch("SELECT day, key_id, model, requests, cost FROM spend_daily "
                                     "WHERE user_id = $1 AND day >= $2", user_id, since_day)
        return [DaySpend(*r) for r in rows]

    async def users_spend_since(self, user_ids: list[str], since_day: int) -> dict[str, float]:
        rows = await self.pool.fetch("SELECT user_id, SUM(cost) FROM spend_daily WHERE user_id = ANY($1::text[]) "
                                     "AND day >= $2 GROUP BY user_id", user_ids, since_day)
        return {r[0]: r[1] for r in rows}

    # -- ledger and spend
    async def spends(self, key_ids: list[str], user_ids: list[str]) -> dict[str, tuple[float, float | None]]:
        out: dict[str, tuple[float, float | None]] = {}
        if key_ids:
            for r in await self.pool.fetch("SELECT id, spend, budget_reset_at FROM keys WHERE id = ANY($1::text[])",
                                           key_ids):
                out["k:" + r[0]] = (r[1], r[2])
        if user_ids:
            for r in await self.pool.fetch("SELECT user_id, spend, budget_reset_at FROM users "
                                           "WHERE user_id = ANY($1::text[])", user_ids):
                out["u:" + r[0]] = (r[1], r[2])
        return out

    async def write_ledger(self, rows: list[tuple], keys: dict, users: dict, now: float) -> None:
        recs = [(*r[:14], bool(r[14]), bool(r[15]), *r[16:]) for r in rows]
        async with self.pool.acquire() as c:
            async with c.transaction():
                await c.copy_records_to_table("ledger", records=recs, columns=list(LEDGER_COLUMNS))
                await c.executemany(_ADD_DAILY, daily_totals(rows))
                # Sorted, so that two replicas flushing together lock rows in the same order.
                for key_id in sorted(keys):
                    d = keys[key_id]
                    r = await c.fetchrow("SELECT spend, budget_reset_at FROM keys WHERE id = $1 FOR UPDATE", key_id)
                    if r is not None:
                        spend, reset_at = roll(r[0], r[1], d.period_s, now)
                        await c.execute("UPDATE keys SET spend = $2, budget_reset_at = $3 WHERE id = $1",
                                        key_id, spend + d.delta, reset_at)
                for user_id in sorted(users):
                    d = users[user_id]
                    await c.execute("INSERT INTO users (user_id, spend, created_at) VALUES ($1, 0, $2) "
                                    "ON CONFLICT (user_id) DO NOTHING", user_id, now)
                    r = await c.fetchrow("SELECT spend, budget_reset_at FROM users WHERE user_id = $1 FOR UPDATE",
                                         user_id)
                    spend, reset_at = roll(r[0], r[1], d.period_s, now)
                    await c.execute("UPDATE users SET spend = $2, budget_reset_at = $3 WHERE user_id = $1",
                                    user_id, spend + d.delta, reset_at)

    # -- stored responses (Responses API)
    async def put_responses(self, recs: list[ResponseRecord]) -> None:
        await self.pool.executemany(
            "INSERT INTO responses (id, key_id, created_at, model, native, data) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data",
            [(r.id, r.key_id, r.created_at, r.model, r.native, r.text()) for r in recs])

    async def get_response(self, response_id: str) -> ResponseRecord | None:
        r = await self.pool.fetchrow("SELECT * FROM responses WHERE id = $1", response_id)
        return ResponseRecord(r["id"], r["key_id"], r["model"], r["native"], r["data"], r["created_at"]) if r else None

    async def delete_response(self, response_id: str) -> bool:
        return await self.pool.execute("DELETE FROM responses WHERE id = $1", response_id) != "DELETE 0"

    async def purge_responses(self, before: float) -> int:
        return int((await self.pool.execute("DELETE FROM responses WHERE created_at < $1", before)).split()[-1])

    async def ledger_totals(self, key_id: str | None = None) -> tuple[int, float]:
        if key_id is None:
            r = await self.pool.fetchrow("SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM ledger")
        else:
            r = await self.pool.fetchrow("SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM ledger WHERE key_id = $1",
                                         key_id)
        return int(r[0]), float(r[1])

    async def ledger_rows(self, key_id: str | None = None, limit: int = 1000) -> list[dict]:
        if key_id is None:
            rows = await self.pool.fetch("SELECT * FROM ledger ORDER BY id DESC LIMIT $1", limit)
        else:
            rows = await self.pool.fetch("SELECT * FROM ledger WHERE key_id = $1 ORDER BY id DESC LIMIT $2",
                                         key_id, limit)
        return [dict(r) for r in rows]
