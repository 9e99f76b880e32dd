"""RPM, TPM, parallel and budget rules, with an injected clock, on both limiters (memory and the real Redis)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from common.asgi import HTTPError
from router.catalog import LimitsConf, LimitSet, load_catalog
from router.limits.memory import MemoryLimiter
from router.limits.policy import Policy
from router.store.base import KeyRecord, UserRecord
from tests.helpers.servers import ROOT

CAT = load_catalog(ROOT / "models.yaml")
PAID = CAT.resolve("openai/gpt-4o")
FREE = CAT.resolve("lbl/llama")


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeStore:
    def __init__(self, users=None, keys=None):
        self.users = users or {}
        self.keys = keys or {}

    async def get_user(self, uid):
        return self.users.get(uid)

    async def find_key(self, kid):
        return self.keys.get(kid)

    async def spends(self, key_ids, user_ids):
        out = {f"k:{i}": (self.keys[i].spend, self.keys[i].budget_reset_at) for i in key_ids if i in self.keys}
        out.update({f"u:{i}": (self.users[i].spend, self.users[i].budget_reset_at) for i in user_ids if i in self.users})
        return out


_n = 0


def call(key, route=PAID, est=10):
    global _n
    _n += 1
    return SimpleNamespace(key=key, route=route, id=f"req-{_n}", prompt_estimate=est, usage=None, cost=0.0, reserve=0.0)


def key(**kw) -> KeyRecord:
    return KeyRecord(id=kw.pop("id", "key-t"), key_hash="h", key_hint="sk-...", user_id=kw.pop("user", "u@lbl.gov"), **kw)


@pytest.fixture(params=["memory", "redis"])
def make(request):
    """A factory of limiters of one kind, sharing one clock."""
    made = []

    def factory(conf: LimitsConf | None = None, store=None, clock=None, lease_s: float = 30.0):
        pol = Policy(conf or LimitsConf(user=LimitSet()))
        clock = clock or Clock()
        store = store or FakeStore()
        if request.param == "memory":
            lim = MemoryLimiter(pol, store, clock)
        else:
            url = request.getfixturevalue("redis_url")
            prefix = request.getfixturevalue("redis_prefix")
            from router.limits.redis import RedisLimiter
            lim = RedisLimiter(url, pol, store, lease_s=lease_s, prefix=prefix, clock=clock)
        made.append(lim)
        return lim, clock
    factory.kind = request.param
    yield factory


def run(coro):
    return asyncio.get_event_loop().run_until_complete(coro)


async def admit(lim, c):
    return await lim.admit(c)


async def settle(lim):
    """Let fire-and-forget releases reach Redis before the next check."""
    if hasattr(lim, "redis"):
        await lim.redis.call("PING")


async def test_rpm_window_slides_by_the_second(make):
    lim, clock = make()
    await lim.start()
    k = key(rpm=3)
    for _ in range(3):
        a = await lim.admit(call(k))
        a.finish(call(k))
        clock.t += 10
    with pytest.raises(HTTPError) as e:
        await lim.admit(call(k))
    assert e.value.status == 429 and "3 requests per minute" in e.value.message
    ra = int(dict(e.value.headers)[b"retry-after"])
    assert 30 <= ra <= 31             # the first request (t=0) leaves the window at t=60; now t=30
    clock.t += 30.5                   # t=60.5: the first second has left the window
    await lim.admit(call(k))
    with pytest.raises(HTTPError):
        await lim.admit(call(k))
    await lim.stop()


async def test_tpm_admits_on_estimate_then_corrects_to_usage(make):
    lim, clock = make()
    await lim.start()
    k = key(tpm=250)
    c1, c2 = call(k, est=100), call(k, est=100)
    a1 = await lim.admit(c1)
    a2 = await lim.admit(c2)
    with pytest.raises(HTTPError) as e:
        await lim.admit(call(k, est=100))
    assert "250 tokens per minute" in e.value.message and "needs about 100" in e.value.message
    for c, a in ((c1, a1), (c2, a2)):          # the upstream reported 20 tokens each
        c.usage = {"prompt_tokens": 15, "completion_tokens": 5}
        a.finish(c)
    await settle(lim)
    a3 = await lim.admit(call(k, est=100))      # 40 used + 100 <= 250
    assert any(h[0] == b"x-ratelimit-remaining-tokens" and int(h[1]) == 250 - 40 - 100 for h in a3.headers)
    # a request that used more than estimated counts in full
    c4 = call(k, est=10)
    a4 = await lim.admit(c4)
    c4.usage = {"prompt_tokens": 10, "completion_tokens": 90}
    a4.finish(c4)
    await settle(lim)
    with pytest.raises(HTTPError):
        await lim.admit(call(k, est=20))       # 40 + 100 + 100 = 240; 240 + 20 > 250
    clock.t += 61
    await lim.admit(call(k, est=200))
    await lim.stop()


async def test_tpm_counts_a_long_request_when_it_ends(make):
    """A request that outlives the window (a long stream) still counts its tokens, at its end."""
    lim, clock = make()
    await lim.start()
    k = key(tpm=1000)
    c = call(k, est=10)
    a = await lim.admit(c)
    clock.t += 61                               # the admission second has left the window
    c.usage = {"prompt_tokens": 10, "completion_tokens": 890}
    a.finish(c)
    await settle(lim)
    a2 = await lim.admit(call(k, est=50))        # 900 used in this window: 50 more fit, 150 would not
    assert any(h[0] == b"x-ratelimit-remaining-tokens" and int(h[1]) == 1000 - 900 - 50 for h in a2.headers)
    with pytest.raises(HTTPError):
        await lim.admit(call(k, est=100))
    clock.t += 30                               # the estimate alone left, and its second stays in the window
    c3 = call(k, est=30)
    a3 = await lim.admit(c3)
    c3.usage = {"prompt_tokens": 5, "completion_tokens": 5}   # used fewer than estimated: the rest comes back
    a3.finish(c3)
    await settle(lim)
    a4 = await lim.admit(call(k, est=1))
    assert any(h[0] == b"x-ratelimit-remaining-tokens" and int(h[1]) == 1000 - 900 - 50 - 10 - 1 for h in a4.headers)
    await lim.stop()


async def test_parallel_slots_released_on_finish(make):
    lim, _ = make()
    await lim.start()
    k = key(max_parallel=2)
    cs = [call(k), call(k)]
    adms = [await lim.admit(c) for c in cs]
    with pytest.raises(HTTPError) as e:
        await lim.admit(call(k))
    assert "limit is 2 in flight" in e.value.message and dict(e.value.headers)[b"retry-after"] == b"1"
    adms[0].finish(cs[0])
    await settle(lim)
    await lim.admit(call(k))
    await lim.stop()


async def test_budget_commercial_only_and_period_reset(make):
    conf = LimitsConf(user=LimitSet(budget=1.0, budget_period="30d"))
    store = FakeStore(users={"u@lbl.gov": UserRecord("u@lbl.gov", spend=0.9, budget_reset_at=1_800_000_000.0 + 86400)})
    lim, clock = make(conf, store)
    await lim.start()
    k = key()
    c = call(k)
    a = await lim.admit(c)           # 0.90 spent of 1.00: admitted
    c.cost = 0.2                     # this request crosses the budget; it is not stopped
    a.finish(c)
    await settle(lim)
    with pytest.raises(HTTPError) as e:
        await lim.admit(call(k))
    assert "Budget exceeded for user u@lbl.gov" in e.value.message and "$1.00" in e.value.message
    assert "Free lbl/* models remain available" in e.value.message
    await lim.admit(call(k, route=FREE))      # free models are not budgeted
    clock.t += 86400 + 1                      # the period ends: spend starts again from zero
    await lim.admit(call(k))
    await lim.stop()


async def test_key_budget_from_key_record(make):
    lim, _ = make(store=FakeStore(keys={}))
    await lim.start()
    k = key(max_budget=0.5, spend=0.5, budget_period=None)
    if make.kind == "redis":
        lim.store.keys[k.id] = k
    with pytest.raises(HTTPError) as e:
        await lim.admit(call(k))
    assert "key key-t" in e.value.message and "never" in e.value.message
    await lim.stop()


async def test_model_group_parallel_per_user(make):
    conf = LimitsConf(user=LimitSet(), models={"lbl/*": LimitSet(parallel=1)})
    lim, _ = make(conf)
    await lim.start()
    k1, k2 = key(id="key-a"), key(id="key-b")    # two keys of one user share the group limit
    await lim.admit(call(k1, route=FREE))
    with pytest.raises(HTTPError) as e:
        await lim.admit(call(k2, route=CAT.resolve("cborg-chat")))
    assert "on lbl/*" in e.value.message
    await lim.admit(call(k2, route=PAID))        # other models are not in the group
    await lim.stop()


async def test_redis_lease_expires_when_not_renewed(redis_url, redis_prefix):
    from router.limits.redis import RedisLimiter
    clock = Clock()
    pol = Policy(LimitsConf(user=LimitSet()))
    dead = RedisLimiter(redis_url, pol, FakeStore(), lease_s=5, prefix=redis_prefix, clock=clock)
    live = RedisLimiter(redis_url, pol, FakeStore(), lease_s=5, prefix=redis_prefix, clock=clock)
    k = key(max_parallel=1)
    await dead.admit(call(k))                      # held by a replica that then dies (never releases)
    with pytest.raises(HTTPError):
        await live.admit(call(k))
    clock.t += 5.1
    await live.admit(call(k))                      # the lease ran out
    await dead.redis.close()
    await live.redis.close()


async def test_redis_leases_renewed_while_in_flight(redis_url, redis_prefix):
    """A request that outlives the lease keeps its slot while its replica lives."""
    import time as _t
    from router.limits.redis import RedisLimiter
    pol = Policy(LimitsConf(user=LimitSet()))
    lim = RedisLimiter(redis_url, pol, FakeStore(), lease_s=1.2, prefix=redis_prefix, clock=_t.time)
    await lim.start()
    k = key(max_parallel=1)
    c = call(k)
    a = await lim.admit(c)
    await asyncio.sleep(2.5)                       # two lease lengths
    with pytest.raises(HTTPError):
        await lim.admit(call(k))
    a.finish(c)
    await settle(lim)
    await lim.admit(call(k))
    await lim.stop()


async def test_redis_lease_renewal_reconnects_after_a_lost_connection(redis_url, redis_prefix):
    """Only a long request in flight, and the connection drops: the renewer reconnects by itself."""
    from router.limits.redis import RedisLimiter
    clock = Clock()
    pol = Policy(LimitsConf(user=LimitSet()))
    lim = RedisLimiter(redis_url, pol, FakeStore(), lease_s=3, prefix=redis_prefix, clock=clock)
    other = RedisLimiter(redis_url, pol, FakeStore(), lease_s=3, prefix=redis_prefix, clock=clock)
    k = key(max_parallel=1)
    await lim.admit(call(k))
    lim.redis._proto.transport.close()             # Redis restarted, a network blip...
    await asyncio.sleep(0.05)
    clock.t += 2
    await lim.renew_once()                         # what the renewer does every lease/3
    clock.t += 2                                   # past the first lease: only the renewal holds it
    with pytest.raises(HTTPError):
        await other.admit(call(k))
    await lim.redis.close()
    await other.redis.close()


async def test_redis_spend_reconciled_up_to_the_database(redis_url, redis_prefix):
    """A finish Redis never ran (its reply is off, so a dropped connection loses it unseen): the
    database's spend, which the ledger wrote, brings Redis's up; never down, never across periods."""
    from router.limits.redis import RedisLimiter
    clock = Clock()
    start = clock.t
    conf = LimitsConf(user=LimitSet(budget=1.0, budget_period="30d"))
    user = UserRecord("u@lbl.gov", spend=0.5, budget_reset_at=start + 86400)
    store = FakeStore(users={"u@lbl.gov": user})
    lim = RedisLimiter(redis_url, Policy(conf), store, prefix=redis_prefix, clock=clock)
    await lim.start()
    k = key()
    c = call(k)
    await lim.admit(c)                    # seeds Redis with the database's 0.50
    user.spend = 1.1                      # the ledger wrote this request's $0.60; its finish was lost
    assert await lim.reconcile_once() == 1
    with pytest.raises(HTTPError) as e:
        await lim.admit(call(k))
    assert "spent $1.10" in e.value.message
    user.spend = 0.2                      # a database behind Redis (rows not flushed yet): Redis keeps its own
    assert await lim.reconcile_once() == 0
    with pytest.raises(HTTPError):
        await lim.admit(call(k))
    # Redis's period ends; the database's, which began at its first flush, ends 5 s later: its
    # spend belongs to the old period and must not come into the new one.
    user.spend, user.budget_reset_at = 5.0, start + 86400 + 5
    clock.t = start + 86400 + 1
    await lim.admit(call(k))              # Redis rolls over to zero
    assert await lim.reconcile_once() == 0
    await lim.admit(call(k))
    clock.t = start + 86400 + 6           # both in the new period: the database's rolled figure is 0
    assert await lim.reconcile_once() == 0
    await lim.admit(call(k))
    await lim.stop()


async def test_redis_down_admits_open_and_counts_errors():
    from router.limits import OPEN
    from router.limits.redis import RedisLimiter
    from tests.helpers.servers import free_port
    errors = []
    lim = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", Policy(LimitsConf()), FakeStore(),
                       on_error=lambda: errors.append(1))
    await lim.start()
    assert await lim.admit(call(key(max_parallel=1))) is OPEN
    assert errors
    await lim.stop()
