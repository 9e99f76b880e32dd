"""A short Redis stall must not lock keys out (issue 14 item 3).

With Redis paused past the client's timeout, the admission goes ahead without limits (logged, counted);
when Redis resumes it runs the late ADMIT script. Before: that lease was never released nor renewed,
and a parallel-1 key was refused for the whole lease (29 s seen). Now the client removes it right
behind the late script, and a lease nobody renews lapses after FIRST_LEASE_S.
"""
from __future__ import annotations

import asyncio
import socket
import time

from common.asgi import HTTPError
from router.catalog import LimitsConf, LimitSet
from router.limits import OPEN
from router.limits.policy import Policy
from router.limits.redis import FIRST_LEASE_S, RedisLimiter
from tests.test_limits_windows import FakeStore, call, key


def pause_redis(ms: int) -> None:
    """CLIENT PAUSE on the real Redis, from a connection of its own."""
    with socket.create_connection(("127.0.0.1", 6379), timeout=2) as s:
        s.sendall(f"CLIENT PAUSE {ms} ALL\r\n".encode())
        assert s.recv(16).startswith(b"+OK")


async def readmitted_after(lim, k, limit_s: float) -> float:
    """Seconds until a call of key `k` is admitted again (polling every 50 ms), or fails past limit_s."""
    t0 = time.monotonic()
    while True:
        try:
            c = call(k)
            a = await lim.admit(c)
        except HTTPError:
            assert time.monotonic() - t0 < limit_s, "still refused"
            await asyncio.sleep(0.05)
            continue
        assert a is not OPEN
        a.finish(c)
        return time.monotonic() - t0


async def test_a_timed_out_admission_leaves_no_lease(redis_url, redis_prefix, caplog):
    lim = RedisLimiter(redis_url, Policy(LimitsConf(user=LimitSet())), FakeStore(), lease_s=30,
                       prefix=redis_prefix, clock=time.time)
    await lim.start()
    try:
        k = key(max_parallel=1)
        c = call(k)
        (await lim.admit(c)).finish(c)                 # connected, scripts loaded
        pause_redis(2500)
        t0 = time.monotonic()
        stalled = call(k)
        assert await lim.admit(stalled) is OPEN        # past the client's 2 s: admitted open
        waited = time.monotonic() - t0
        await asyncio.sleep(0.6)                       # Redis resumes and runs the late ADMIT
        again = await readmitted_after(lim, k, FIRST_LEASE_S + 1)
        print(f"\nRedis paused 2.5 s: the stalled admission waited {waited:.2f} s; the parallel-1 key was "
              f"admitted again {again:.2f} s after Redis resumed (+0.6 s)")
        assert again < 1.0
        assert any("Redis limiter error" in r.getMessage() for r in caplog.records)
    finally:
        await lim.stop()


async def test_an_unrenewed_lease_lapses_after_the_first_lease(redis_url, redis_prefix):
    """The late ADMIT's release lost too (a connection dropped): the lease is short, nobody renews it."""
    clock_lim = RedisLimiter(redis_url, Policy(LimitsConf(user=LimitSet())), FakeStore(), lease_s=30,
                             prefix=redis_prefix, clock=time.time)
    other = RedisLimiter(redis_url, Policy(LimitsConf(user=LimitSet())), FakeStore(), lease_s=30,
                         prefix=redis_prefix, clock=time.time)
    k = key(max_parallel=1)
    await clock_lim.admit(call(k))         # never finished, never renewed (no renewer running)
    await clock_lim.redis.close()
    t0 = time.monotonic()
    took = await readmitted_after(other, k, FIRST_LEASE_S + 2)
    assert FIRST_LEASE_S - 1 < took <= FIRST_LEASE_S + 2
    await other.redis.close()
