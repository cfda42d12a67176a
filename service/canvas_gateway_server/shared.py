"""Redis: the budgets and the kept results every replica shares (CGW_REDIS_URL).

Each operation is one Lua script, so it is atomic and costs one round trip:

- budgets: `reserve` and `settle` are `limits.Budget.reserve` and `Budget.settle` in Lua, on a
  hash per (tenant, budget) (pause, window reset, what is left) and a sorted set of the calls
  under way, each with a lease: a replica that dies with calls under way does not hold the
  budget past their lease (the longest a call can take).
- results: `claim`, `mark_sending` and `keep` of `idempotency.ResultStore`, on a hash per
  (tenant, key, batch). A claim names its process; each process keeps a heartbeat key alive
  while it runs, so a claim whose process is gone is seen at once, not after the lease: sent
  again if its call had not started (no `sending` mark), else LOST. The heartbeat also checks
  that Redis still holds what it kept (`_BEAT`): one that restarted empty refuses keys.

Why not the `limits` library: its Redis strategies count hits in windows we would have to
configure, while Braze tells us what is left (x-ratelimit-remaining and -reset) and a call
must not start while the calls under way would spend it; neither that nor a pause until a
reset fits a hit counter. The scripts are short and are tested against the same cases as the
in-process stores.

When Redis does not answer within CGW_REDIS_TIMEOUT_SECONDS the store raises
`StoreUnavailable`. `FailoverBudgets` then fails closed (the batch ends NOT_ATTEMPTED /
UNAVAILABLE) or open (this process's own budgets, a metric and a log line) as configured;
the results store always fails closed: a key is a promise not to send twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .idempotency import Claim, StoreLost, Verdict, keep_beating
from .limits import MAX_PAUSE_SECONDS, RECHECK_SECONDS, BudgetStore, Hold, StoreUnavailable, Ticket
from .metrics import Metrics
from .upstream import Delivery, Reply

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX: Final = "cgw:"
HEARTBEAT_SECONDS: Final = 1.0
"""How often a process renews its heartbeat key."""
HEARTBEAT_TTL_MS: Final = 5000
"""How long a heartbeat lasts unrenewed: a process silent this long is taken as gone."""
GENERATION_KEY: Final = PREFIX + "generation"
BUDGET_TTL_SECONDS: Final = 7300
"""Budget keys outlive Braze's longest window (an hour) when unused, then go."""
RESETTLE_FIRST_SECONDS: Final = 0.1
RESETTLE_MAX_SECONDS: Final = 5.0
"""A settle Redis did not take is tried again after the first, doubling up to the most, and at
once when Redis answers a reserve."""
MAX_UNSETTLED: Final = 10_000
"""Settles kept for Redis at most; past them the oldest is left to its lease."""

_RESERVE: Final = """
local now = tonumber(ARGV[1])
local b = redis.call('HMGET', KEYS[1], 'paused', 'reset', 'left', 'limit')
local paused = tonumber(b[1]) or 0
if paused > now then return {'spent', string.format('%.17g', paused)} end
local reset = tonumber(b[2]) or 0
local left = tonumber(b[3]) or 0
local limit = tonumber(b[4]) or 0
if reset > 0 and reset <= now then
  reset = 0
  left = math.max(limit, 0)
  redis.call('HSET', KEYS[1], 'reset', '0', 'left', string.format('%d', left))
end
local room = nil
if reset > 0 or left > 0 then
  room = left
elseif limit == 0 then
  room = 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if room and redis.call('ZCARD', KEYS[2]) >= room then
  local again = now + tonumber(ARGV[4])
  if reset > 0 then again = math.min(reset, again) end
  return {'held', string.format('%.17g', again)}
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {'go', ''}
"""

_SETTLE: Final = """
redis.call('ZREM', KEYS[2], ARGV[1])
local now = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'paused', 'reset', 'left', 'limit')
local paused = tonumber(b[1]) or 0
if ARGV[3] == '1' then
  local limit = tonumber(ARGV[9])
  if limit and limit > 0 then
    redis.call('HSET', KEYS[1], 'limit', string.format('%d', limit))
  elseif (tonumber(b[4]) or 0) == 0 and tonumber(ARGV[4]) >= 200 and tonumber(ARGV[4]) < 300 then
    redis.call('HSET', KEYS[1], 'limit', '-1')
  end
  local remaining = tonumber(ARGV[5])
  local reset = tonumber(ARGV[6])
  if remaining and reset and reset > now then
    local current = tonumber(b[2]) or 0
    if reset > current then
      redis.call('HSET', KEYS[1], 'reset', string.format('%d', reset), 'left', string.format('%d', remaining))
    elseif reset == current then
      redis.call('HSET', KEYS[1], 'left', string.format('%d', math.min(tonumber(b[3]) or 0, remaining)))
    end
  end
  if (ARGV[4] == '429' or remaining == 0) and reset and reset > now then
    paused = math.max(paused, math.min(reset, now + tonumber(ARGV[7])))
    redis.call('HSET', KEYS[1], 'paused', string.format('%.17g', paused))
  end
  redis.call('EXPIRE', KEYS[1], ARGV[8])
end
if paused > now then return string.format('%.17g', paused) end
return '0'
"""

_CLAIM: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[8] then
  redis.call('SET', KEYS[2], 'lost')
  return {'refused'}
end
local v = redis.call('HMGET', KEYS[1], 'digest', 'owner', 'at', 'kept', 'sending')
if not v[1] then
  redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'owner', ARGV[1], 'at', ARGV[3], 'token', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'claimed'}
end
if v[1] ~= ARGV[2] then
  if v[4] then return {'mismatch', v[4]} end
  return {'mismatch'}
end
if v[4] then return {'kept', v[4]} end
local alive = v[2] == ARGV[1] or redis.call('EXISTS', ARGV[6] .. v[2]) == 1
if alive and tonumber(v[3]) + tonumber(ARGV[4]) > tonumber(ARGV[3]) then return {'busy'} end
if not v[5] then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'at', ARGV[3], 'token', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'reclaimed'}
end
redis.call('HSET', KEYS[1], 'kept', '')
return {'lost'}
"""

_MARK: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  redis.call('SET', KEYS[2], 'lost')
  return 'refused'
end
local v = redis.call('HMGET', KEYS[1], 'token', 'kept')
if v[1] ~= ARGV[1] or v[2] then return 'taken' end
redis.call('HSET', KEYS[1], 'sending', '1')
return 'ok'
"""

_KEEP: Final = """
local v = redis.call('HMGET', KEYS[1], 'token', 'kept')
if ARGV[3] == '0' then
  if v[1] == ARGV[2] and not v[2] then redis.call('DEL', KEYS[1]) end
  return 0
end
if v[1] and v[1] ~= ARGV[2] and not v[2] then return 0 end
redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'kept', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

_BEAT: Final = """
local m = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if not m then
    m = ARGV[2]
    redis.call('SET', KEYS[1], m)
  end
elseif m ~= ARGV[1] and not (ARGV[1] == 'lost' and m) then
  m = 'lost'
  redis.call('SET', KEYS[1], m)
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return m
"""
"""The heartbeat, and the check that Redis still holds what it kept. `cgw:generation` names
what Redis holds: set by the first gateway that finds none, remembered by each process. Gone
or changed under a running process, Redis lost its data (it restarted without it): the process
sets it to `lost`, and every gateway refuses keys until an operator sets a new generation
(`canvas-gateway-server --accept-lost-keys`), which a refusing process adopts. Claims and marks
check it too, in their own round trip, so none is made in an emptied Redis."""

_ACCEPT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
"""A new generation, only in place of `lost` (two operators at once make one)."""

LOST: Final = "lost"
LOST_TEXT: Final = (
    "idempotency keys are refused: the shared results store (Redis) lost what it kept (it "
    "restarted without its data), so a repeat could send again what was sent; an operator must "
    "acknowledge it (canvas-gateway-server --accept-lost-keys) before keys are taken again"
)


MAX_CONNECTIONS: Final = 100
"""Connections to Redis one process opens at most; an operation beyond them waits for one."""


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client that gives up after `timeout`. It tries once more only when a pooled connection
    turns out closed (after a Redis restart), never after a timeout: every script is safe to run
    twice anyway (a second claim is BUSY, a second reservation lapses, a second keep is the same).

    Its pool holds MAX_CONNECTIONS, and an operation past them waits for a free one within the
    same `timeout` (redis-py's default pool refuses it at once, "Too many connections"): more
    batches in flight than connections wait their turn instead of failing, and the connections a
    struggling Redis gets from one process do not grow with the batches waiting on it."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes its pool


async def _call(what: str, operation: Awaitable[T]) -> T:
    try:
        return await operation
    except (RedisError, OSError, TimeoutError) as exc:
        # The message never carries the URL (it may hold a password) nor Redis' own text.
        raise StoreUnavailable(
            f"the shared {what} store (Redis) did not answer ({type(exc).__name__})"
        ) from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ReserveLost(StoreUnavailable):
    """A reserve whose answer never came: Redis may have made it (the script ran, or runs later),
    and then counts `ticket` as under way until its lease ends unless it is settled."""

    def __init__(self, message: str, ticket: Ticket) -> None:
        super().__init__(message)
        self.ticket = ticket


class RedisBudgets:
    """A `BudgetStore` in Redis: every replica's calls count against one budget."""

    def __init__(self, client: aioredis.Redis, lease: float) -> None:
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._lease = lease

    @staticmethod
    def _keys(key: tuple[str, bool]) -> list[str]:
        base = f"{PREFIX}budget:{key[0]}:{'broadcast' if key[1] else 'recipients'}"
        return [base, base + ":calls"]

    async def reserve(self, key: tuple[str, bool], now: float) -> Ticket | Hold:
        token = uuid.uuid4().hex
        args: list[str | int] = [
            repr(now),
            token,
            repr(now + self._lease),
            repr(RECHECK_SECONDS),
            BUDGET_TTL_SECONDS,
        ]
        try:
            kind, until = await _call("budgets", self._reserve(keys=self._keys(key), args=args))
        except StoreUnavailable as exc:
            raise ReserveLost(str(exc), Ticket(key, token, shared=True)) from None
        if _text(kind) == "go":
            return Ticket(key, token, shared=True)
        return Hold(float(_text(until)), _text(kind) == "spent")

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float:
        responded = reply is not None and reply.delivery is Delivery.RESPONDED
        rate = reply.rate if reply is not None else None
        args: list[str | int] = [
            ticket.token,
            repr(now),
            "1" if responded else "0",
            str(reply.status if reply is not None else 0),
            "" if rate is None or rate.remaining is None else str(rate.remaining),
            "" if rate is None or rate.reset is None else str(rate.reset),
            repr(MAX_PAUSE_SECONDS),
            BUDGET_TTL_SECONDS,
            "" if rate is None or rate.limit is None else str(rate.limit),
        ]
        paused = await _call("budgets", self._settle(keys=self._keys(ticket.key), args=args))
        return float(_text(paused))


class FailoverBudgets:
    """The shared budgets, and what to do while they do not answer: with a `fallback` (fail
    open) this process's own budgets, loudly; without one (fail closed) StoreUnavailable.

    A call whose settle did not reach Redis would stay counted as under way there until its lease
    ends (the longest call, 40 s by default), holding back every replica's calls. It is settled
    again, with its reply, as soon as Redis answers: by one task of this process on the shared
    client's pool, which tries the oldest first and backs off while Redis fails, so the load on a
    struggling Redis does not grow with the number of failures. A reserve whose answer never came
    (`ReserveLost`: Redis may have made it) is released the same way, with no reply."""

    def __init__(
        self,
        shared: BudgetStore,
        fallback: BudgetStore | None,
        metrics: Metrics | None = None,
        retry_seconds: tuple[float, float] = (RESETTLE_FIRST_SECONDS, RESETTLE_MAX_SECONDS),
        capacity: int = MAX_UNSETTLED,
    ) -> None:
        self._shared = shared
        self._fallback = fallback
        self._metrics = metrics or Metrics()
        self._failing = False
        self._retry_seconds = retry_seconds
        self._capacity = capacity
        self._unsettled: dict[str, tuple[Ticket, Reply | None, float]] = {}
        """Settles Redis did not take, by token, oldest first."""
        self._answered = asyncio.Event()
        self._resettling: asyncio.Task[None] | None = None

    @property
    def unsettled(self) -> int:
        """Calls ended here whose settle Redis has not taken yet."""
        return len(self._unsettled)

    def _failed(self, op: str, exc: StoreUnavailable) -> None:
        self._metrics.store_failure("budgets", op)
        if not self._failing:
            self._failing = True
            if self._fallback is not None:
                self._metrics.store_fallback("budgets", True)
                log.error("%s: budgets are this process's own until it answers (fail open)", exc)
            else:
                log.error("%s: batches end NOT_ATTEMPTED until it answers (fail closed)", exc)

    def _recovered(self) -> None:
        self._answered.set()  # settles left behind go now
        if self._failing:
            self._failing = False
            self._metrics.store_fallback("budgets", False)
            log.warning("the shared budgets store (Redis) answers again: budgets are shared again")

    async def reserve(self, key: tuple[str, bool], now: float) -> Ticket | Hold:
        try:
            found = await self._shared.reserve(key, now)
        except StoreUnavailable as exc:
            self._failed("reserve", exc)
            if isinstance(exc, ReserveLost):  # released once Redis answers, not at its lease's end
                self._keep_unsettled(exc.ticket, None, now)
            if self._fallback is None:
                raise
            return await self._fallback.reserve(key, now)
        self._recovered()
        return found

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float:
        if not ticket.shared:
            return await self._fallback.settle(ticket, reply, now) if self._fallback else 0.0
        try:
            return await self._shared.settle(ticket, reply, now)
        except StoreUnavailable as exc:
            self._failed("settle", exc)
            self._keep_unsettled(ticket, reply, now)
            return 0.0

    def _keep_unsettled(self, ticket: Ticket, reply: Reply | None, now: float) -> None:
        if len(self._unsettled) >= self._capacity:  # the oldest is left to its lease
            del self._unsettled[next(iter(self._unsettled))]
        self._unsettled[ticket.token] = (ticket, reply, now)
        if self._resettling is None or self._resettling.done():
            self._resettling = asyncio.get_running_loop().create_task(self._resettle())

    async def _resettle(self) -> None:
        first, most = self._retry_seconds
        delay = first
        while self._unsettled:
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), delay)
            delay = first if await self._settle_unsettled() else min(most, delay * 2)

    async def _settle_unsettled(self) -> bool:
        """Settle what Redis did not take, oldest first; False at the first failure."""
        while self._unsettled:
            token, (ticket, reply, now) = next(iter(self._unsettled.items()))
            try:
                await self._shared.settle(ticket, reply, now)
            except StoreUnavailable as exc:
                self._failed("settle", exc)
                return False
            self._unsettled.pop(token, None)
        return True

    async def stop(self) -> None:
        """At shutdown: stop trying in the background, and settle once more what is left."""
        if self._resettling is not None:
            self._resettling.cancel()
            await asyncio.gather(self._resettling, return_exceptions=True)
        await self._settle_unsettled()


class RedisResults:
    """An `idempotency.ResultStore` in Redis, with this process's heartbeat and the check that
    Redis still holds what it kept (`_BEAT`)."""

    def __init__(
        self, client: aioredis.Redis, ttl: float, lease: float, metrics: Metrics | None = None
    ) -> None:
        self._client = client
        self._claim = client.register_script(_CLAIM)
        self._mark = client.register_script(_MARK)
        self._keep = client.register_script(_KEEP)
        self._beat_script = client.register_script(_BEAT)
        self._ttl_ms = str(int(ttl * 1000))
        self._lease = repr(lease)
        self._metrics = metrics or Metrics()
        self.owner = uuid.uuid4().hex
        self.generation = ""
        """The generation of Redis' data this process knows; "" before Redis first answers."""
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def lost(self) -> bool:
        """Keys are refused: Redis lost what it kept, and no operator has acknowledged it yet."""
        return self.generation == LOST

    @staticmethod
    def _keys(scope: str, index: int) -> list[str]:
        return [f"{PREFIX}result:{scope}:{index}", GENERATION_KEY]

    async def _known(self) -> str:
        """The generation claims are made under; StoreLost while keys are refused."""
        if not self.generation:
            await self.beat()
        if self.lost:
            raise StoreLost(LOST_TEXT)
        return self.generation

    async def claim(self, scope: str, index: int, digest: str, token: str) -> Claim:
        generation = await self._known()
        args = [
            self.owner,
            digest,
            repr(time.time()),
            self._lease,
            self._ttl_ms,
            PREFIX + "owner:",
            token,
            generation,
        ]
        reply = await _call("results", self._claim(keys=self._keys(scope, index), args=args))
        verdict = _text(reply[0])
        if verdict == "refused":
            self._found_lost()
            raise StoreLost(LOST_TEXT)
        return Claim(Verdict(verdict), reply[1] if len(reply) > 1 else None)

    async def mark_sending(self, scope: str, index: int, token: str) -> bool:
        generation = await self._known()
        reply = await _call("results", self._mark(keys=self._keys(scope, index), args=[token, generation]))
        if _text(reply) == "refused":
            self._found_lost()
            raise StoreLost(LOST_TEXT)
        return _text(reply) == "ok"

    async def keep(self, scope: str, index: int, digest: str, token: str, kept: bytes | None) -> None:
        args: list[str | bytes] = [
            digest,
            token,
            "0" if kept is None else "1",
            kept or b"",
            self._ttl_ms,
        ]
        await _call("results", self._keep(keys=self._keys(scope, index)[:1], args=args))

    async def beat(self) -> None:
        """Renew this process's heartbeat and check the generation (one round trip)."""
        args = [self.generation, uuid.uuid4().hex, str(HEARTBEAT_TTL_MS)]
        keys = [GENERATION_KEY, f"{PREFIX}owner:{self.owner}"]
        found = _text(await _call("results", self._beat_script(keys=keys, args=args)))
        if found == LOST:
            self._found_lost()
        elif found != self.generation:
            if self.lost:
                self._metrics.store_lost(False)
                log.warning(
                    "the loss of the shared results store's data was acknowledged: idempotency "
                    "keys are taken again"
                )
            self.generation = found

    def _found_lost(self) -> None:
        if not self.lost:
            self.generation = LOST
            self._metrics.store_lost(True)
            log.error("%s", LOST_TEXT)

    def start(self, on_failure: Callable[[], None] = lambda: None) -> None:
        """Keep this process's heartbeat alive until `stop`."""
        beating = keep_beating(self.beat, on_failure, HEARTBEAT_SECONDS)
        self._heartbeat = asyncio.get_running_loop().create_task(beating)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        # Gone at once: claims left behind are LOST now, not in HEARTBEAT_TTL_MS.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._client.delete(f"{PREFIX}owner:{self.owner}")


async def accept_lost_keys(client: aioredis.Redis) -> str:
    """The operator's acknowledgement that Redis lost the keys' results: a new generation, which
    every gateway adopts within a heartbeat. What it says happened."""
    accept = client.register_script(_ACCEPT)
    if not await accept(keys=[GENERATION_KEY], args=[LOST, uuid.uuid4().hex]):
        return "no loss to acknowledge: idempotency keys are taken"
    return (
        "acknowledged: idempotency keys are taken again; results kept before the loss are gone, "
        "so a repeat of an earlier key sends its batches again"
    )
