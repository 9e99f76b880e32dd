"""The Responses API's stored responses (`store`, `previous_response_id`, GET/DELETE /v1/responses/{id}),
written behind the reply.

`put` only records a response in a pending map, so no answer waits for the database: the write before
the reply was most of what /v1/responses added over chat (scripts/bench_gateway, docs/benchmarks.md).
A background task writes what is pending every `interval` seconds (sooner when `max_batch` wait), one
transaction a batch. Reads look at the pending map and at the batch being written before the store, so
a `previous_response_id` or a GET sent the moment the reply arrives finds the response on this gateway.
Another replica or worker sharing the database sees it once written: a read that misses waits
`miss_wait` (a few intervals) and asks the store again before the caller gets a 404. A delete waits for
a write in progress that holds the response, then deletes it.

On graceful shutdown `stop` writes everything pending; after SIGKILL at most `interval` of responses is
lost (their answers were delivered, only their continuation goes). A failed write keeps the batch for
the next try, up to `max_pending` responses (the oldest are dropped past that, with an error log).
"""
from __future__ import annotations

import asyncio
import logging

from common.tasks import BatchWriter

from .store.base import ResponseRecord

log = logging.getLogger("cborg.responses")


class StoredResponses(BatchWriter):
    name = "responses-writer"

    def __init__(self, store, interval: float = 0.1, max_batch: int = 500, max_pending: int = 100_000,
                 miss_wait: float | None = None):
        super().__init__(interval)
        self.store = store
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.miss_wait = 3 * interval if miss_wait is None else miss_wait
        self._pending: dict[str, ResponseRecord] = {}
        self._writing: dict[str, ResponseRecord] = {}    # the batch being written (readable meanwhile)
        self.written = 0
        self.dropped = 0

    # -- hot path -----------------------------------------------------------------------------
    def put(self, rec: ResponseRecord) -> None:
        """Keep a response (written with the next batch; readable here at once)."""
        self._pending[rec.id] = rec
        if len(self._pending) >= self.max_batch:
            self._wake.set()

    def _local(self, rid: str) -> ResponseRecord | None:
        return self._pending.get(rid) or self._writing.get(rid)

    async def get(self, rid: str) -> ResponseRecord | None:
        rec = self._local(rid) or await self.store.get_response(rid)
        if rec is None and self.miss_wait > 0:
            # Perhaps written by another replica within its write interval: ask again once it has written.
            await asyncio.sleep(self.miss_wait)
            rec = self._local(rid) or await self.store.get_response(rid)
        return rec

    async def delete(self, rid: str) -> bool:
        had = (self._pending.pop(rid, None) or self._writing.pop(rid, None)) is not None
        async with self._lock:     # a batch being written that holds it lands first, then it goes
            return await self.store.delete_response(rid) or had

    def pending(self) -> int:
        return len(self._pending) + len(self._writing)

    def backlog(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Write what is pending now (one transaction)."""
        async with self._lock:
            if not self._pending:
                return
            self._writing, self._pending = self._pending, {}
            try:
                await self.store.put_responses(list(self._writing.values()))
                self.written += len(self._writing)
            except Exception as e:  # noqa: BLE001 - keep them and try again next time
                log.error("writing %d stored responses failed, will retry: %s", len(self._writing), e)
                self._pending = {**self._writing, **self._pending}   # (deleted meanwhile: gone from both)
                over = len(self._pending) - self.max_pending
                if over > 0:
                    for rid in list(self._pending)[:over]:
                        del self._pending[rid]
                    self.dropped += over
                    log.error("stored responses: %d dropped (the store has been failing; %d still pending)",
                              over, len(self._pending))
            finally:
                self._writing = {}
