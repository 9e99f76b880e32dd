"""Background tasks and services that start and must stop cleanly."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable


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
