"""Background tasks and services that start and must stop cleanly."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable

log = logging.getLogger("cborg.tasks")


async def stop_task(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait until it has finished."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def lifespan(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]):
    """A FastAPI/Starlette lifespan that runs a service's start, and its stop however serving ended."""
    @contextlib.asynccontextmanager
    async def run(app):
        await start()
        try:
            yield
        finally:
            await stop()
    return run


class BatchWriter:
    """A background task that writes what the hot path queued, every `interval` seconds or sooner
    when woken (`self._wake.set()`, e.g. a full batch), and on `stop` writes what is left (a few
    tries) before the store closes. Subclasses give `flush()` (which holds `self._lock` while it
    writes, so that stopping never cancels a write half-done) and `backlog()`."""

    name = "writer"

    def __init__(self, interval: float):
        self.interval = interval
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    async def flush(self) -> None:
        raise NotImplementedError

    def backlog(self) -> int:
        """How many items are still to be written."""
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        async with self._lock:
            await stop_task(self._task)
        for _ in range(5):
            await self.flush()
            if not self.backlog():
                break
            await asyncio.sleep(0.5)
        if self.backlog():
            log.error("%s: %d items could not be written at shutdown", self.name, self.backlog())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()
