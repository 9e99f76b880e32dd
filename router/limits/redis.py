"""Limits shared by gateway replicas through Redis (CBORG_REDIS_URL).

Each admission is one Lua script (atomic: check every scope, then count in every scope); each end of
request is one more, sent without waiting for its reply. Parallel slots are leases in a sorted set
(member = request id, score = expiry in ms): a new lease is short (FIRST_LEASE_S) until the renewer's next
tick, and this replica renews the leases of its in-flight requests every lease/3 seconds, so a replica
that dies stops renewing and its slots free themselves within `lease_s`. An admission the client gave up
on (Redis stalled) is released right behind it, or lapses with its short first lease.
Budgets: spend per scope lives in a Redis hash, seeded from the database the first time a scope is
seen (and again if Redis loses it); each call in progress holds its worst-case cost in the scope's holds
zset (a lease as the parallel slots are: renewed while in flight, removed at its end); the ledger keeps the database's copy, and every `reconcile_s`
Redis's figure is raised to the database's where Redis missed a request's end (RECONCILE).
If Redis is unreachable, requests are admitted without limits (logged, counted in /metrics).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from common.tasks import stop_task
from common.bounded import BoundedDict

from . import OPEN, fit_estimate, limit_header, ratelimit_headers, reject, tokens_used
from .budget import roll
from .policy import Check, Policy
from .resp import RedisError, RespClient, pack, pack_args, sha1

log = logging.getLogger("cborg.limits")

FIRST_LEASE_S = 5.0
"""A new parallel slot's or budget hold's first lease: the renewer's next tick (a second later) makes it
a whole lease (models.yaml `limits.lease_s`). An admission whose reply never came (Redis stalled past the
client's timeout) runs late with this short lease, and nobody renews it."""

# KEYS: 5 per check (parallel zset, request window, token window, budget hash, budget holds zset)
# ARGV: now (ms), sec, request id, lease expiry (ms), token estimate, reservation (pico-dollars),
#       number of checks, then 5 per check: parallel, rpm, tpm, budget, period (-1 = none)
# A budget hold is a member "<request id>:<pico-dollars>" of the scope's holds zset (score = expiry, as
# the parallel leases): the call's worst-case cost, held until it ends or its lease lapses.
# Times go in as whole milliseconds and counts come back as whole numbers: a float's shortest
# decimal text (both ways) was a fifth of the gateway's instructions per admission.
# Reply: {0, then per rpm/tpm check {'r' or 't', check index, remaining}} | {1, index, limit, value,
#        used, reset[, held]} | {2, index} (a budget scope to seed)
ADMIT = """
local nowms, sec, rid, lease, est, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[7])
local reserve = tonumber(ARGV[6]) / 1e12
local now = nowms / 1000
-- A window is a hash: one field per second (its count), 't' = the total of the fields in the
-- window, 'o' = the oldest second not yet expired. Each call expires only the seconds that left
-- the window since the last call, so the work is constant per request.
local lo = sec - 59
local function window(key)
  local w = redis.call('HMGET', key, 'o', 't')
  local o, total = tonumber(w[1]), tonumber(w[2]) or 0
  if not o then return 0 end
  if o < lo then
    for s = o, math.min(lo - 1, o + 59) do
      local v = redis.call('HGET', key, s)
      if v then total = total - tonumber(v); redis.call('HDEL', key, s) end
    end
    redis.call('HSET', key, 'o', lo, 't', total)
  end
  return total
end
local function reset_in(key, total, need, limit)
  local over, freed = total + need - limit, 0
  local seconds = {}
  for j = 0, 59 do seconds[j + 1] = lo + j end
  local counts = redis.call('HMGET', key, unpack(seconds))
  for j = 1, 60 do
    if counts[j] then
      freed = freed + tonumber(counts[j])
      if freed >= over then return tostring(math.max(0, lo + j - 1 + 60 - now)) end
    end
  end
  return '60'
end
local function add(key, n_)
  redis.call('HSETNX', key, 'o', lo)
  redis.call('HINCRBY', key, sec, n_)
  redis.call('HINCRBY', key, 't', n_)
  redis.call('EXPIRE', key, 120)
end
local out = {0}
for i = 0, n - 1 do
  local a = 8 + i * 5
  local par, rpm, tpm, budget, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local kp, kr, kt, kb, kh = KEYS[i * 5 + 1], KEYS[i * 5 + 2], KEYS[i * 5 + 3], KEYS[i * 5 + 4], KEYS[i * 5 + 5]
  if par >= 0 then
    redis.call('ZREMRANGEBYSCORE', kp, '-inf', nowms)
    local c = redis.call('ZCARD', kp)
    if c >= par then return {1, i, 'parallel', tostring(par), tostring(c), '1'} end
  end
  if rpm >= 0 then
    local used = window(kr)
    if used + 1 > rpm then return {1, i, 'rpm', tostring(rpm), tostring(used), reset_in(kr, used, 1, rpm)} end
    out[#out + 1] = {'r', i, rpm - used - 1}
  end
  if tpm >= 0 then
    local used = window(kt)
    if used + est > tpm then return {1, i, 'tpm', tostring(tpm), tostring(used), reset_in(kt, used, est, tpm)} end
    out[#out + 1] = {'t', i, tpm - used - est}
  end
  if budget >= 0 then
    local b = redis.call('HMGET', kb, 'spend', 'reset_at')
    if not b[1] then return {2, i} end
    local spend, reset_at = tonumber(b[1]), tonumber(b[2])
    if period >= 0 then
      if not reset_at then
        reset_at = now + period
        redis.call('HSET', kb, 'reset_at', tostring(reset_at))
      elseif now >= reset_at then
        reset_at = reset_at + (math.floor((now - reset_at) / period) + 1) * period
        spend = 0
        redis.call('HSET', kb, 'spend', '0', 'reset_at', tostring(reset_at))
      end
    end
    local held = 0
    redis.call('ZREMRANGEBYSCORE', kh, '-inf', nowms)
    for _, m in ipairs(redis.call('ZRANGE', kh, 0, -1)) do held = held + tonumber(string.match(m, ':(%d+)$')) end
    held = held / 1e12
    if spend + held >= budget or (held > 0 and spend + held + reserve > budget) then
      return {1, i, 'budget', tostring(budget), tostring(spend), tostring(reset_at or -1), tostring(held)}
    end
  end
end
for i = 0, n - 1 do
  local a = 8 + i * 5
  if tonumber(ARGV[a]) >= 0 then redis.call('ZADD', KEYS[i * 5 + 1], lease, rid); redis.call('EXPIRE', KEYS[i * 5 + 1], 86400) end
  if tonumber(ARGV[a + 1]) >= 0 then add(KEYS[i * 5 + 2], 1) end
  if tonumber(ARGV[a + 2]) >= 0 then add(KEYS[i * 5 + 3], est) end
  if reserve > 0 and tonumber(ARGV[a + 3]) >= 0 then
    redis.call('ZADD', KEYS[i * 5 + 5], lease, rid .. ':' .. ARGV[6]); redis.call('EXPIRE', KEYS[i * 5 + 5], 86400)
  end
end
return out
"""

# KEYS: 4 per check (parallel zset, token window, budget hash, budget holds zset)
# ARGV: request id, admission second, token estimate, tokens used, cost (pico-dollars), now (ms),
#       reservation (pico-dollars, as admitted), number of checks, then 3 per check: has parallel,
#       has tpm, period (-1 none; -2 no budget)
# The estimate leaves its admission second (if still in the window) and the tokens used are counted
# in the second the request ends: a request longer than the window still counts in full.
FINISH = """
local rid, sec, est, used, cost, now, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]) / 1e12, tonumber(ARGV[6]) / 1000, tonumber(ARGV[8])
local fsec = math.floor(now)
for i = 0, n - 1 do
  local a = 9 + i * 3
  if ARGV[a] == '1' then redis.call('ZREM', KEYS[i * 4 + 1], rid) end
  if ARGV[a + 2] ~= '-2' and ARGV[7] ~= '0' then redis.call('ZREM', KEYS[i * 4 + 4], rid .. ':' .. ARGV[7]) end
  if ARGV[a + 1] == '1' and est ~= used then
    local kt = KEYS[i * 4 + 2]
    if est ~= 0 and redis.call('HEXISTS', kt, sec) == 1 then
      redis.call('HINCRBY', kt, sec, -est)
      redis.call('HINCRBY', kt, 't', -est)
    end
    if used > 0 then
      redis.call('HSETNX', kt, 'o', fsec - 59)
      redis.call('HINCRBY', kt, fsec, used)
      redis.call('HINCRBY', kt, 't', used)
      redis.call('EXPIRE', kt, 120)
    end
  end
  local period = tonumber(ARGV[a + 2])
  if period ~= -2 and cost > 0 and redis.call('EXISTS', KEYS[i * 4 + 3]) == 1 then
    local reset_at = tonumber(redis.call('HGET', KEYS[i * 4 + 3], 'reset_at'))
    if period >= 0 and reset_at and now >= reset_at then
      reset_at = reset_at + (math.floor((now - reset_at) / period) + 1) * period
      redis.call('HSET', KEYS[i * 4 + 3], 'spend', '0', 'reset_at', tostring(reset_at))
    end
    redis.call('HINCRBYFLOAT', KEYS[i * 4 + 3], 'spend', cost)
  end
end
return 1
"""

# KEYS: a budget hash. ARGV: the database's spend and reset time (rolled to now; '' = no period), and
# how far two reset times may differ and still name the same period (the database's and Redis's
# periods start when each first saw the scope, a flush apart).
# The database's spend is the ledger's, flushed after each request ended: it trails Redis's and
# is never above the truth. So a database spend above Redis's means Redis missed a finish (its
# reply is switched off, so a dropped connection loses it unseen, or Redis restarted and was
# seeded before the last rows were flushed): Redis takes the database's figure.
RECONCILE = """
local b = redis.call('HMGET', KEYS[1], 'spend', 'reset_at')
if not b[1] then return 0 end
local spend, reset_at, db, db_reset = tonumber(b[1]), tonumber(b[2]), tonumber(ARGV[1]), tonumber(ARGV[2])
if (reset_at == nil) ~= (db_reset == nil) then return 0 end
if reset_at and math.abs(reset_at - db_reset) > tonumber(ARGV[3]) then return 0 end
if db > spend + 1e-12 then
  redis.call('HSET', KEYS[1], 'spend', ARGV[1])
  return 1
end
return 0
"""

SEED = """
if redis.call('HSETNX', KEYS[1], 'spend', ARGV[1]) == 1 and ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'reset_at', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class Commands:
    """The encoded, per-checks constant parts of the admit and finish scripts' calls.

    Only a few arguments differ per request (time, request id, estimate); the rest is encoded once
    per (key version, route) and spliced in, which keeps the gateway's CPU per request low."""

    __slots__ = ("admit_head", "admit_tail", "admit_n", "finish_head", "finish_tail", "finish_n", "par_keys",
                 "hold_keys", "tpm_cap")

    def __init__(self, lim: "RedisLimiter", checks: tuple[Check, ...]):
        keys, args, fkeys, fargs = [], [], [], []
        for c in checks:
            p, r, t, b, h = lim._names(c.scope)
            keys += (p, r, t, b, h)
            args += (-1 if c.parallel is None else c.parallel, -1 if c.rpm is None else c.rpm,
                     -1 if c.tpm is None else c.tpm, -1 if c.budget is None else c.budget,
                     -1 if c.period_s is None else c.period_s)
            fkeys += (p, t, b, h)
            fargs += ("1" if c.parallel is not None else "0", "1" if c.tpm is not None else "0",
                      -2 if c.budget is None else (-1 if c.period_s is None else c.period_s))
        self.admit_head = pack_args("EVALSHA", sha1(ADMIT), len(keys), *keys)
        self.admit_tail = pack_args(*args) if args else b""
        self.admit_n = 3 + len(keys) + 7 + len(args)
        self.finish_head = pack_args("EVALSHA", sha1(FINISH), len(fkeys), *fkeys)
        self.finish_tail = pack_args(*fargs) if fargs else b""
        self.finish_n = 3 + len(fkeys) + 8 + len(fargs)
        self.par_keys = [lim._names(c.scope)[0] for c in checks if c.parallel is not None]
        self.hold_keys = [lim._names(c.scope)[4] for c in checks if c.budget is not None]
        self.tpm_cap = fit_estimate(None, checks)

    def admit(self, *head) -> bytes:
        return b"*%d\r\n" % self.admit_n + self.admit_head + pack_args(*head) + self.admit_tail

    def finish(self, *head) -> bytes:
        return b"*%d\r\n" % self.finish_n + self.finish_head + pack_args(*head) + self.finish_tail


class RedisAdmission:
    __slots__ = ("lim", "checks", "rid", "sec", "est", "headers", "cmds", "hold")

    def __init__(self, lim, checks, rid, sec, est, headers, cmds, hold):
        self.lim = lim
        self.checks = checks
        self.rid = rid
        self.sec = sec
        self.est = est
        self.headers = headers
        self.cmds = cmds
        self.hold = hold         # the budget reservation, pico-dollars (0: none)

    def finish(self, call) -> None:
        self.lim._finish(self, call)


class RedisLimiter:
    def __init__(self, url: str, policy: Policy, store, lease_s: float = 30.0, prefix: str = "cborg:",
                 clock: Callable[[], float] = time.time, on_error: Callable[[], None] | None = None,
                 reconcile_s: float = 10.0):
        self.redis = RespClient(url)
        self.policy = policy
        self.store = store
        self.lease_s = lease_s
        self.lease_ms = int(lease_s * 1000)
        self.first_ms = int(min(lease_s, FIRST_LEASE_S) * 1000)   # a new lease's, until the renewer's next tick
        self.tick_s = min(1.0, lease_s / 3)
        self.fresh: list[RedisAdmission] = []       # admitted since the renewer's last tick
        self.prefix = prefix
        self.clock = clock
        self.on_error = on_error
        self.held: dict[str, RedisAdmission] = {}    # this replica's in-flight leases
        self._renewer: asyncio.Task | None = None
        self.reconcile_s = reconcile_s
        self.budget_scopes: dict[str, float | None] = {}   # budget scope -> period (s): reconciled
        self._reconciler: asyncio.Task | None = None
        self._keys_cache: dict[str, tuple] = BoundedDict(100_000)
        self._cmds: dict[int, tuple[tuple, Commands]] = BoundedDict(50_000)
        self._last_err = 0.0

    async def _load_scripts(self) -> None:
        for s in (ADMIT, FINISH, SEED, RECONCILE):
            await self.redis.call("SCRIPT", "LOAD", s)

    async def _run(self, packed: bytes):
        """A scripted call; scripts are loaded again if Redis lost them (a restart)."""
        try:
            return await self.redis.call_packed(packed)
        except RedisError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
            await self._load_scripts()
            return await self.redis.call_packed(packed)

    async def start(self) -> None:
        try:
            await self._load_scripts()
        except RedisError as e:
            log.error("Redis unavailable at start-up (limits open until it is back): %s", e)
        self._renewer = asyncio.create_task(self._renew(), name="lease-renewer")
        self._reconciler = asyncio.create_task(self._reconcile(), name="spend-reconciler")

    async def stop(self) -> None:
        await stop_task(self._renewer)
        await stop_task(self._reconciler)
        await self.redis.close()

    def _names(self, scope: str) -> tuple:
        k = self._keys_cache.get(scope)
        if k is None:
            p = self.prefix + scope
            k = self._keys_cache[scope] = (p + ":par", p + ":req", p + ":tok", p + ":spend", p + ":hold")
        return k

    def _error(self, e: Exception) -> None:
        if self.on_error:
            self.on_error()
        now = time.monotonic()
        if now - self._last_err > 10:
            self._last_err = now
            log.error("Redis limiter error, admitting without limits: %s", e)

    def admit_now(self, call) -> None:
        return None          # every admission is a round trip to Redis

    async def admit(self, call):
        checks = self.policy.checks(call.key, call.route)
        if not checks:
            return OPEN
        # By identity, as memory.py's plans: Policy hands out one tuple per (key version, route),
        # and hashing a tuple of dataclasses field by field costs more than this lookup's purpose.
        got = self._cmds.get(id(checks))
        if got is None or got[0] is not checks:
            got = self._cmds[id(checks)] = (checks, Commands(self, checks))
            for c in checks:               # the budgets this replica has met: reconcile_once's
                if c.budget is not None:
                    self.budget_scopes[c.scope] = c.period_s
        cmds = got[1]
        now = self.clock()
        sec = int(now)
        est = call.prompt_estimate if cmds.tpm_cap is None else min(call.prompt_estimate, cmds.tpm_cap)
        nowms = int(now * 1000)
        hold = round(call.reserve * 1e12) if cmds.hold_keys else 0
        packed = cmds.admit(nowms, sec, call.id, nowms + self.first_ms, est, hold, len(checks))
        try:
            for _ in range(len(checks) + 1):
                res = await self._run(packed)
                if res[0] != 2:
                    break
                await self._seed(checks[res[1]], call.key)   # a budget scope Redis does not know yet
            else:
                raise RedisError("budget counters vanished while being seeded")
        except (RedisError, asyncio.TimeoutError) as e:
            self._error(e)
            self._abandon(call.id, cmds, hold)
            return OPEN
        if res[0] == 1:
            c = checks[res[1]]
            limit, value, used = res[2].decode(), float(res[3]), float(res[4])
            if limit == "budget":
                ra = float(res[5])
                raise reject(c, "budget", value, used, (ra - now) if ra > 0 else None, reset_at=ra if ra > 0 else None,
                             held=float(res[6]))
            raise reject(c, limit, value, used, float(res[5]), need=est)
        req_h = tok_h = None
        for kind, i, rem in res[1:]:
            if kind == b"r":
                if req_h is None or rem < req_h[1]:
                    req_h = (limit_header(b"x-ratelimit-limit-requests", checks[i].rpm), rem)
            elif tok_h is None or rem < tok_h[1]:
                tok_h = (limit_header(b"x-ratelimit-limit-tokens", checks[i].tpm), rem)
        headers = ratelimit_headers(req_h, tok_h)
        adm = RedisAdmission(self, checks, call.id, sec, est, headers, cmds, hold)
        if cmds.par_keys or hold:
            self.held[call.id] = adm
            self.fresh.append(adm)
        return adm

    def _abandon(self, rid: str, cmds: Commands, hold: int) -> None:
        """An admission given up on (Redis did not answer in time: the call goes ahead unlimited) may
        still run when Redis resumes: its lease and hold are removed right behind it, on the same
        connection (so in order). If the connection is gone, they lapse with their first, short lease."""
        try:
            for k in cmds.par_keys:
                self.redis.send_noreply(pack("ZREM", k, rid))
            if hold:
                for k in cmds.hold_keys:
                    self.redis.send_noreply(pack("ZREM", k, f"{rid}:{hold}"))
        except RedisError:
            pass

    async def _seed(self, c: Check, key) -> None:
        """Put the database's spend for a scope into Redis (only if Redis has none)."""
        if c.scope.startswith("k:"):
            rec = await self.store.find_key(key.id)
            spend, reset_at = (rec.spend, rec.budget_reset_at) if rec else (0.0, None)
        else:
            u = await self.store.get_user(key.user_id)
            spend, reset_at = (u.spend, u.budget_reset_at) if u else (0.0, None)
        spend, reset_at = roll(spend, reset_at, c.period_s, self.clock())
        ttl = int((c.period_s or 365 * 86400) * 2)
        await self.redis.eval(SEED, [self._names(c.scope)[3]], [repr(spend), repr(reset_at) if reset_at else "", ttl])

    def _finish(self, adm: RedisAdmission, call) -> None:
        """Release, token correction and spend in one script, with its reply switched off.

        `CLIENT REPLY SKIP` makes Redis send nothing back for the script: no reply to parse, no
        future to resolve, on every request. What cannot be seen is a failure, and the only likely
        one is NOSCRIPT after a Redis restart; the next admission then reloads the scripts, and a
        slot lost that way frees itself when its lease ends."""
        self.held.pop(adm.rid, None)
        packed = adm.cmds.finish(adm.rid, adm.sec, adm.est, tokens_used(call), round(call.cost * 1e12),
                                 int(self.clock() * 1000), adm.hold, len(adm.checks))
        try:
            self.redis.send_noreply(packed)
        except RedisError:
            asyncio.ensure_future(self._finish_later(packed))

    async def _finish_later(self, packed: bytes) -> None:
        try:
            await self._run(packed)
        except (RedisError, asyncio.TimeoutError) as e:
            self._error(e)

    async def _renew(self) -> None:
        """Every tick (a second), the leases admitted since the last get a whole lease; every third of
        a lease, all of this replica's leases are extended."""
        waited = 0.0
        while True:
            await asyncio.sleep(self.tick_s)
            waited += self.tick_s
            if waited >= self.lease_s / 3 - 1e-9:
                waited = 0.0
                self.fresh.clear()
                if self.held:
                    await self.renew_once()
            elif self.fresh:
                fresh, self.fresh = self.fresh, []
                await self.renew_once([a for a in fresh if a.rid in self.held])

    async def renew_once(self, adms: list[RedisAdmission] | None = None) -> None:
        """Extend the leases of this replica's in-flight requests (or of `adms`), reconnecting if the
        connection was lost (long streams may be all that is in flight: no admission would reconnect
        for them), and never waiting on Redis for longer than a third of a lease. Only leases still
        there are extended (ZADD XX): a released or lapsed one stays gone."""
        expiry = int((self.clock() + self.lease_s) * 1000)
        if adms is None:
            adms = list(self.held.values())
        if not adms:
            return
        try:
            await self.redis.connect()
            futs = [self.redis.send("ZADD", k, "XX", expiry, adm.rid) for adm in adms for k in adm.cmds.par_keys]
            futs += [self.redis.send("ZADD", k, "XX", expiry, f"{adm.rid}:{adm.hold}")
                     for adm in adms if adm.hold for k in adm.cmds.hold_keys]
            for r in await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), self.lease_s / 3):
                if isinstance(r, Exception):
                    raise r
        except (RedisError, asyncio.TimeoutError) as e:
            self._error(e)

    async def _reconcile(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_s)
            if self.budget_scopes:
                try:
                    await self.reconcile_once()
                except Exception as e:  # noqa: BLE001 - a database or Redis hiccup: next time
                    log.warning("spend reconciliation failed: %s", e)

    async def reconcile_once(self) -> int:
        """Bring Redis's spend of the budget scopes this replica has met up to the database's where
        Redis missed some (RECONCILE says when). Returns how many scopes were raised."""
        scopes = dict(self.budget_scopes)
        if len(self.budget_scopes) > 100_000:
            self.budget_scopes.clear()
        keys = [s[2:] for s in scopes if s.startswith("k:")]
        users = [s[2:] for s in scopes if s.startswith("u:")]
        db = await self.store.spends(keys, users)
        now = self.clock()
        calls = []
        for scope, period in scopes.items():
            row = db.get(scope)
            if row is not None:
                spend, reset_at = roll(row[0], row[1], period, now)
                calls.append(("EVALSHA", sha1(RECONCILE), 1, self._names(scope)[3], repr(spend),
                              repr(reset_at) if reset_at is not None else "", (period or 0) / 2))
        for attempt in (1, 2):
            await self.redis.connect()
            replies = await asyncio.wait_for(asyncio.gather(*[self.redis.send(*c) for c in calls],
                                                            return_exceptions=True), max(1.0, self.lease_s / 3))
            errors = [r for r in replies if isinstance(r, Exception)]
            if attempt == 1 and any(str(e).startswith("NOSCRIPT") for e in errors):
                await self._load_scripts()        # Redis restarted since: once more with the scripts
                continue
            if errors:
                raise errors[0]
            return sum(1 for r in replies if r == 1)
        return 0

    def spend_of(self, scope: str) -> float | None:
        return None
