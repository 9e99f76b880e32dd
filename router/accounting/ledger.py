"""The spend ledger: one row per request, written in batches off the hot path.

`add` only appends to a list. A background task flushes every `interval` seconds (or sooner when
the batch is large) in one transaction: the rows, plus each key's and user's spend delta. The
same flush hands the request log lines (JSON, made per request) to the `cborg.request` logger as one
record, so per-request logging costs one handler call per batch and the lines go where logging goes:
stderr in production (common/logs.py writes them as they are), pytest's captured logs in tests.
On graceful shutdown `stop` flushes everything; after SIGKILL the rows of requests still in flight
(a row is added when a request ends) and at most `interval` of ended ones are lost.
If the database is unreachable, rows stay queued and the next flush retries; a row the database
refuses on its own (a value out of its column's range) is quarantined: logged whole and counted.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass

import orjson

from common.logs import PREFORMATTED
from common.tasks import BatchWriter

log = logging.getLogger("cborg.ledger")
reqlog = logging.getLogger("cborg.request")

LEDGER_COLUMNS = ("request_id", "ts", "key_id", "user_id", "model", "served_model", "provider", "prompt_tokens",
                  "cached_tokens", "completion_tokens", "cost", "status", "latency_ms", "ttft_ms", "stream",
                  "estimated", "endpoint")


@dataclass
class SpendDelta:
    delta: float = 0.0
    period_s: float | None = None


def spend_deltas(rows: list[tuple], periods: dict[str, tuple]) -> tuple[dict[str, SpendDelta], dict[str, SpendDelta]]:
    """Spend per key and per user in a batch of rows (every key and user in it, cost or not: a
    user's first row creates its record), with the budget periods their spend rolls over by."""
    keys: dict[str, SpendDelta] = {}
    users: dict[str, SpendDelta] = {}
    for r in rows:
        kd = keys.get(r[2])
        if kd is None:
            kp, up = periods.get(r[2], (None, None))
            kd = keys[r[2]] = SpendDelta(period_s=kp)
            if r[3] not in users:
                users[r[3]] = SpendDelta(period_s=up)
        kd.delta += r[10]
        users[r[3]].delta += r[10]
    return keys, users


DAY_S = 86400


def daily_totals(rows: list[tuple]) -> list[tuple]:
    """A batch's rows summed per (user, UTC day, key, model): requests, prompt tokens, completion
    tokens, cost. The stores add them to the daily aggregate (table spend_daily) in the rows'
    transaction, so that the Key Manager's pages read days, never the ledger. Sorted: replicas
    flushing together update the aggregate's rows in the same order."""
    acc: dict[tuple, list] = {}
    for r in rows:
        k = (r[3], int(r[1] // DAY_S), r[2], r[4])
        a = acc.get(k)
        if a is None:
            acc[k] = [1, r[7], r[9], r[10]]
        else:
            a[0] += 1
            a[1] += r[7]
            a[2] += r[9]
            a[3] += r[10]
    return [(*k, *v) for k, v in sorted(acc.items())]


class Ledger(BatchWriter):
    name = "ledger-writer"

    def __init__(self, store, interval: float = 0.5, max_batch: int = 2000, log_requests: bool = True,
                 max_queue: int = 2_000_000):
        super().__init__(interval)
        self.store = store
        self.max_batch = max_batch
        self.log_requests = log_requests
        self.max_queue = max_queue
        self._rows: list[tuple] = []
        self._periods: dict[str, tuple] = {}
        self._logs: list[bytes] = []
        self.written = 0
        self.dropped = 0
        self.quarantined = 0

    # -- hot path: append only ----------------------------------------------------------------
    def add(self, row: tuple, periods: tuple[float | None, float | None]) -> None:
        """One request's row; `periods`: the budget periods of its key and its user. The spend
        deltas are summed per batch at the flush, not per request here."""
        self._rows.append(row)
        self._periods[row[2]] = periods
        if len(self._rows) >= self.max_batch:
            self._wake.set()

    def log(self, line: dict) -> None:
        """A request log line, written with the next flush."""
        if self.log_requests:
            self._logs.append(orjson.dumps(line, default=str))

    def pending(self) -> int:
        return len(self._rows)

    def backlog(self) -> int:
        return len(self._rows)

    async def flush(self) -> None:
        async with self._lock:
            self._write_logs()
            if not self._rows or self.store is None:
                return
            rows, periods = self._rows, self._periods
            self._rows, self._periods = [], {}
            left = await self._write(rows, periods)
            if left:
                self._requeue(left, periods)

    async def _write(self, rows: list[tuple], periods: dict[str, tuple]) -> list[tuple]:
        """Write `rows`; the rows left to retry (the database unreachable). When the database answers
        but refuses the batch, the rows it refuses are quarantined (halving the batch until a refused
        row stands alone), so that one bad row never holds back the others."""
        keys, users = spend_deltas(rows, periods)
        try:
            await self.store.write_ledger(rows, keys, users, time.time())
            self.written += len(rows)
            return []
        except Exception as e:  # noqa: BLE001 - keep the rows and try again next time
            if not await self.store.ping():
                log.error("ledger flush of %d rows failed, will retry: %s", len(rows), e)
                return rows
            if len(rows) == 1:
                self._quarantine(rows[0], e)
                return []
        mid = len(rows) // 2
        left = await self._write(rows[:mid], periods)
        if left:
            return left + rows[mid:]
        return await self._write(rows[mid:], periods)

    def _quarantine(self, row: tuple, err: Exception) -> None:
        """A row the database refused on its own: logged whole (it can be written by hand) and counted
        (`cborg_ledger_quarantined_rows` in /metrics), never retried."""
        self.quarantined += 1
        log.error("ledger row quarantined (the database refused it: %s): %s", err,
                  json.dumps(dict(zip(LEDGER_COLUMNS, row)), default=repr))

    def _requeue(self, rows: list[tuple], periods: dict[str, tuple]) -> None:
        self._rows[:0] = rows
        for k, v in periods.items():
            self._periods.setdefault(k, v)      # (a newer key version's periods win)
        if len(self._rows) > self.max_queue:
            drop = len(self._rows) - self.max_queue
            del self._rows[:drop]
            self.dropped += drop
            log.error("ledger queue over %d rows: dropped the %d oldest", self.max_queue, drop)

    def _write_logs(self) -> None:
        if not self._logs:
            return
        lines, self._logs = self._logs, []
        text = b"\n".join(lines).decode()
        if reqlog.hasHandlers():
            reqlog.info(text, extra={PREFORMATTED: True})
            return
        try:   # a process where logging was never set up (uvicorn's spawned --workers): stderr as it is
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
