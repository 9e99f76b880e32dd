"""Dynamic batching: concurrent requests share one forward pass.

A request brings one or more texts. The first request of a batch waits at most `max_wait_ms`
for company, or until `max_batch` texts are gathered; requests that arrive while a batch runs
wait in the queue and form the next batch as soon as the model is free (their wait is already
over). One batch runs at a time, in one worker thread, so the event loop keeps answering.

Measured on the 2-core development machine with all-MiniLM-L6-v2 (../shared/notes/local-models.md):
about 175 texts/s one at a time against about 1,070 texts/s in batches of 64.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class QueueFull(Exception):
    pass


class _Item:
    __slots__ = ("texts", "fut", "t")

    def __init__(self, texts: Sequence[str], fut: asyncio.Future, t: float):
        self.texts = texts
        self.fut = fut
        self.t = t


class DynamicBatcher:
    """`run(list_of_text_lists)` is called in the worker thread with one batch and returns one
    result per request (a value, or an exception to raise in that request alone)."""

    def __init__(self, run: Callable[[list[Sequence[str]]], list[Any]], max_batch: int = 64,
                 max_wait_ms: float = 5.0, max_queue: int = 4096):
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.waiting = 0                 # texts queued, not yet in a batch
        self.running = 0                 # texts in the batch being computed
        self.batches = 0
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: Sequence[str]) -> Any:
        if self.waiting + len(texts) > self.max_queue and self.waiting:
            raise QueueFull(f"{self.waiting} texts are waiting (the queue holds {self.max_queue})")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting += len(texts)
        self.queue.put_nowait(_Item(texts, fut, loop.time()))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        q = self.queue
        while True:
            first = await q.get()
            batch = [first]
            n = len(first.texts)
            deadline = first.t + self.max_wait
            while n < self.max_batch:
                if q.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(q.get(), left)
                    except asyncio.TimeoutError:
                        break
                else:
                    item = q.get_nowait()
                batch.append(item)
                n += len(item.texts)
            batch = [b for b in batch if not b.fut.done()]   # callers gone (cancelled)
            self.waiting -= n
            if not batch:
                continue
            self.running = sum(len(b.texts) for b in batch)
            try:
                results = await loop.run_in_executor(self.worker, self.run, [b.texts for b in batch])
            except Exception as e:  # noqa: BLE001 - the whole batch failed: tell every caller
                results = [e] * len(batch)
            finally:
                self.running = 0
            self.batches += 1
            for b, r in zip(batch, results):
                if b.fut.done():
                    continue
                if isinstance(r, BaseException):
                    b.fut.set_exception(r)
                else:
                    b.fut.set_result(r)
