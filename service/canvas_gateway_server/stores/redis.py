"""Redis: the budgets and the kept results every replica shares (CGW_REDIS_URL).

Each operation is one Lua script (`redis_scripts`), so it is atomic and costs one round trip:

- budgets: `reserve` and `settle` are `rate_budget.RateBudget.reserve` and `.settle` in Lua, on a
  hash per (workspace, pool) (pause, window reset, what is left, the gateway's calls in the
  window) and a sorted set of the calls
  under way, each with a lease: a replica that dies with calls under way does not hold the
  budget past their lease (the longest a call can take). A settle whose reply tells Redis nothing
  it must know at once (an ample budget left, in a window already told) is sent behind, within
  SETTLE_BEHIND_SECONDS, with the others of its pool: one script for them all.
- results: `claim`, `mark_sending` and `keep` of `idempotency.ResultStore`, on a hash per
  (tenant, key, batch). A claim names its process; each process keeps a heartbeat key alive
  while it runs, so a claim whose process is gone is seen at once, not after the lease: sent
  again if its call had not started (no `sending` mark), else LOST. The heartbeat also checks
  that Redis still holds what it kept (`scripts.BEAT`): one that restarted empty refuses keys.

Why not the `limits` library: its Redis strategies count hits in windows we would have to
configure, while Braze tells us what is left (x-ratelimit-remaining and -reset) and a call
must not start while the calls under way would spend it; neither that nor a pause until a
reset fits a hit counter. The scripts are short and are tested against the same cases as the
in-process stores.

When Redis does not answer within CGW_REDIS_TIMEOUT_SECONDS the store raises
`StoreUnavailable`. `failover.FailoverBudgets` then fails closed (the batch ends NOT_ATTEMPTED /
UNAVAILABLE) or open (this process's own budgets, a metric and a log line) as configured;
the results store always fails closed: a key is a promise not to send twice.

Both stores share one client, `resp.LeanRedis`: one connection per process, every command
pipelined on it (why not redis-py's client: `resp`). Over the ~300 lines the house aims for,
for a reason: both stores share that client, its timeouts, the key layout (PREFIX, the
generation) and the loss check (`acknowledge_loss`); the scripts themselves are in
`redis_scripts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..context import IdempotencyScope
from ..errors import StoreLost, StoreUnavailable
from ..idempotency import Claim, Verdict
from ..metrics import Metrics
from ..outcomes import Row
from ..rate_budget import (
    AUDIENCE,
    FAIR_SECONDS,
    MAX_PAUSE_SECONDS,
    NO_HEADROOM,
    RECHECK_SECONDS,
    BudgetKey,
    Headroom,
    Hold,
    ReserveLost,
    Ticket,
    pool_kind,
)
from ..reply import Delivery, Reply
from . import redis_scripts as scripts
from .heartbeat import Heartbeat
from .resp import LeanRedis, ReplyError, address

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
AUDIENCE_TTL_SECONDS: Final = 300
"""An audience's pool (Braze: a minute's window) goes sooner: there can be many."""


LOST: Final = "lost"
LOST_TEXT: Final = (
    "idempotency keys are refused: the shared results store (Redis) lost what it kept (it "
    "restarted without its data), so a repeat could send again what was sent; an operator must "
    "acknowledge it (canvas-gateway-server --accept-lost-keys) before keys are taken again"
)


def connect(url: str, timeout: float) -> LeanRedis:
    """A client that gives up on a command after `timeout`, connecting nothing yet; ValueError
    or TypeError for a URL redis-py's parser refuses. A connection found closed (after a Redis
    restart) is replaced and the command sent once more, never after a timeout: every script is
    safe to run twice anyway (a second claim is BUSY, a second reservation lapses, a second
    keep is the same). However many batches are in flight, a process holds one connection."""
    return LeanRedis(address(url), timeout)


async def _call(what: str, operation: Awaitable[T]) -> T:
    try:
        return await operation
    except (ReplyError, OSError, TimeoutError) as exc:
        # The message never carries the URL (it may hold a password) nor Redis' own text.
        raise StoreUnavailable(
            f"the shared {what} store (Redis) did not answer ({type(exc).__name__})"
        ) from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


LEASE_CALLS: Final = 8
"""Calls a plain reserve asks Redis for at once while the pool has room for many more: this
process hands out the others itself, one Redis round trip for up to this many batches."""
LEASE_SPREAD: Final = 4
"""A lease takes at most a 1/LEASE_SPREAD of the room left after the calls under way: a pool
with less room than LEASE_SPREAD * LEASE_CALLS lends smaller leases, and one call at a time
when it is nearly spent (then every call asks Redis, as without leases)."""
AMPLE: Final = 4 * LEASE_SPREAD * LEASE_CALLS
"""A reply showing at least this many calls left is taken as leaving a lease room (without a
headroom): within a lease's 0.2 s only others' spending outside the gateway could change that."""
MAX_LOST: Final = 10_000
"""Reserves whose answer never came remembered at most (as `failover.MAX_UNSETTLED`)."""
SETTLE_BEHIND_SECONDS: Final = 0.005
"""A settle whose reply tells Redis nothing it must know at once is sent within this, with the
others of its pool: one script for them all. Such a reply shows an ample budget left (AMPLE) in
a window this process already told Redis of, with no lease to check and no pause: nothing in it
narrows the room, nor widens it much. Meanwhile its call is still counted under way, which can
only hold others' calls back; every other settle is sent at once, with those behind first."""
SETTLE_RETRY_SECONDS: Final = 1.0
"""Settles sent behind that Redis did not take are tried again after this."""
SETTLE_GROUP: Final = 256
"""Settles in one script at most (a script holds Redis while it runs)."""
LEASE_FRESH_SECONDS: Final = 0.2
"""How long a lease's calls may be handed out; those left then are released in Redis."""


@dataclass(slots=True)
class _Lease:
    """Calls Redis counts as under way that this process has not started yet: (token, ours)."""

    calls: list[tuple[str, int]]
    until: float
    """Handed out only before this (the reserve's clock), and never after a pause was seen."""
    headroom: Headroom
    """The party's, for which it was taken: only it is handed them."""

    def fits(self, state: Sequence[Any], now: float) -> bool:
        """Whether every call under way, this lease's included, still fits the room a settle
        found (`scripts.SETTLE`: reset, left, limit, ours, under way), by `RateBudget.reserve`'s
        rule; a window that has turned is left to Redis."""
        reset, left, limit, ours, under = (int(float(_text(value))) for value in state)
        if reset and reset <= now:
            return False
        known = bool(reset or left)
        room = left if known else 1 if limit == 0 else None
        if known and self.headroom.active:
            room = self.headroom.room(left, max(limit, 0), ours, under)
        return room is None or under <= room


class RedisBudgets:
    """A `BudgetStore` in Redis: every replica's calls count against one budget.

    Leases (LEASE_CALLS): while no other party (tenant, lane) of its lane is active and the pool
    has ample room, one reserve takes several calls, each counted in Redis as a call under way (and
    the party's) from that moment: the budget's bound, the headroom and the fair share hold at that
    moment exactly as if they were reserved one by one. They are handed out to the same party
    within LEASE_FRESH_SECONDS, their lease extended by as much. Those not handed out are released
    (`scripts.RELEASE`) then, or as soon as a settle of this process finds a pause or less room
    than the calls under way (a reply said less is left): the one-by-one rule, checked with each
    reply instead of each call. Replies to other processes are seen at the next lease; and a party
    that starts waiting meanwhile waits at most LEASE_FRESH_SECONDS for the fair share to count it."""

    def __init__(self, client: LeanRedis, lease: float, lease_calls: int = LEASE_CALLS) -> None:
        self._reserve = client.script(scripts.RESERVE)
        self._settle = client.script(scripts.SETTLE)
        self._release = client.script(scripts.RELEASE)
        self._lease = lease
        self._lease_calls = lease_calls
        self._leases: dict[tuple[BudgetKey, int], _Lease] = {}
        """The leases held, by pool and party (one each)."""
        self._lost: dict[str, int] = {}
        """Reserves whose answer never came, by token: how many calls each may have taken."""
        self._tasks: set[asyncio.Task[None]] = set()
        """Releases of lapsed leases, and settles sent behind."""
        self._settles: dict[BudgetKey, list[list[str]]] = {}
        """Settles not sent yet, by pool, in the order their calls ended (`_behind`)."""
        self._flushing: set[BudgetKey] = set()
        """Pools whose settles are to be sent soon."""
        self._windows: dict[BudgetKey, int] = {}
        """The window (x-ratelimit-reset) of each pool this process last told Redis of at once: a
        reply of another window, or the first, may widen the room, so it is never sent behind."""

    @staticmethod
    def _keys(key: BudgetKey) -> list[str]:
        """The workspace's name (from the tenants file, or a digest: never a key) and the pool."""
        base = f"{PREFIX}pool:{key[0]}:{key[1]}"
        return [base, base + ":calls", base + ":waited"]

    @staticmethod
    def _ttl(key: BudgetKey) -> int:
        return AUDIENCE_TTL_SECONDS if pool_kind(key[1]) == AUDIENCE else BUDGET_TTL_SECONDS

    async def reserve(self, key: BudgetKey, now: float, headroom: Headroom = NO_HEADROOM) -> Ticket | Hold:
        slot = (key, headroom.party)
        if (lent := self._leases.get(slot)) is not None:
            if lent.until > now and lent.calls and lent.headroom == headroom:
                token, ours = lent.calls.pop()
                return Ticket(key, token, shared=True, ours=ours, party=headroom.party)
            await self._release_lease(key, self._leases.pop(slot))  # before this reserve asks
        want = self._lease_calls
        token = f"{headroom.party}.{uuid.uuid4().hex}" if headroom.party else uuid.uuid4().hex
        args: list[str | int] = [
            repr(now),
            token,
            repr(now + self._lease),
            repr(RECHECK_SECONDS),
            self._ttl(key),
            *headroom.args(),
            repr(FAIR_SECONDS),
            want,
            repr(now + self._lease + LEASE_FRESH_SECONDS),
            LEASE_SPREAD,
        ]
        try:
            reply = await _call("budgets", self._reserve(keys=self._keys(key), args=args))
        except StoreUnavailable as exc:
            if want > 1:
                self._lost[token] = want
                if len(self._lost) > MAX_LOST:  # the oldest are left to their lease
                    del self._lost[next(iter(self._lost))]
            raise ReserveLost(str(exc), Ticket(key, token, shared=True, party=headroom.party)) from None
        kind, until = _text(reply[0]), _text(reply[1])
        if kind != "go":
            return Hold(float(until), kind == "spent")
        ours = int(until)
        if int(reply[2]) > 1:
            self._lend(key, token, ours, int(reply[2]), now, headroom)
        return Ticket(key, token, shared=True, ours=ours, party=headroom.party)

    def _lend(
        self, key: BudgetKey, token: str, ours: int, count: int, now: float, headroom: Headroom
    ) -> None:
        """Keep the calls of a lease (beside those of one taken meanwhile for the same party)."""
        calls = [(f"{token}/{i}", ours + i) for i in range(count - 1, 0, -1)]  # handed out from the end
        slot = (key, headroom.party)
        lent = self._leases.get(slot)
        if lent is not None and lent.headroom == headroom:
            lent.calls[:0] = calls
            return
        if lent is not None:
            self._lapse(slot, lent)
        lent = self._leases[slot] = _Lease(calls, now + LEASE_FRESH_SECONDS, headroom)
        asyncio.get_running_loop().call_later(LEASE_FRESH_SECONDS, self._lapse, slot, lent)

    def _lapse(self, slot: tuple[BudgetKey, int], lent: _Lease) -> None:
        """The lease's time is up: what is left of it is released in the background."""
        if self._leases.get(slot) is lent:
            del self._leases[slot]
            self._background(self._release_lease(slot[0], lent))

    async def _release_lease(self, key: BudgetKey, lent: _Lease | None) -> None:
        """Release in Redis the calls of a lease not handed out (if Redis does not answer, they
        lapse at their lease)."""
        if lent is not None and lent.calls:
            with contextlib.suppress(StoreUnavailable):
                tokens = [token for token, _ in lent.calls]
                await _call("budgets", self._release(keys=self._keys(key)[:2], args=tokens))

    async def stop(self) -> None:
        """At shutdown: the calls lent and not handed out go back now, not at their lease's end."""
        while self._leases:
            (key, _), lent = self._leases.popitem()
            await self._release_lease(key, lent)
        for key in list(self._settles):  # the settles not sent yet go now (once, else left to their lease)
            while calls := self._take(key):
                try:
                    await self._send_settles(key, calls, None, check=False)
                except StoreUnavailable:
                    break
            self._settles.pop(key, None)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _behind(self, key: BudgetKey, calls: list[list[str]], delay: float, first: bool = False) -> None:
        """Settle `calls` within `delay`, with the others of their pool meanwhile (`first`: before
        them, the order they ended in)."""
        waiting = self._settles.setdefault(key, [])
        if first:
            waiting[:0] = calls
        else:
            waiting += calls
        del waiting[:-MAX_LOST]  # Redis has not taken them for long: the oldest lapse at their lease
        if key not in self._flushing:
            self._flushing.add(key)
            asyncio.get_running_loop().call_later(delay, self._flush, key)

    def _take(self, key: BudgetKey) -> list[list[str]]:
        """The oldest SETTLE_GROUP settles of the pool waiting to be sent; the others, if any (after
        Redis did not answer for a while), are sent next, at once."""
        waiting = self._settles.pop(key, [])
        if len(waiting) > SETTLE_GROUP:
            self._settles[key] = waiting[SETTLE_GROUP:]
            self._flushing.add(key)
            asyncio.get_running_loop().call_soon(self._flush, key)
        return waiting[:SETTLE_GROUP]

    def _flush(self, key: BudgetKey) -> None:
        self._flushing.discard(key)
        if calls := self._take(key):
            self._background(self._settle_behind(key, calls))

    async def _settle_behind(self, key: BudgetKey, calls: list[list[str]]) -> None:
        with contextlib.suppress(StoreUnavailable):  # kept, and tried again
            await self._send_settles(key, calls, None, check=False)

    async def _send_settles(
        self, key: BudgetKey, behind: list[list[str]], call: list[str] | None, check: bool
    ) -> list[Any]:
        """One SETTLE script for the calls settled behind and then `call`, in the order they ended.
        If Redis does not take it, those behind are kept, tried again after SETTLE_RETRY_SECONDS."""
        args: list[str | int] = ["1" if check else "0", repr(MAX_PAUSE_SECONDS), self._ttl(key)]
        for each in [*behind, call] if call is not None else behind:
            args += each
        try:
            found: list[Any] = await _call("budgets", self._settle(keys=self._keys(key), args=args))
        except StoreUnavailable:
            self._behind(key, behind, SETTLE_RETRY_SECONDS, first=True)
            raise
        return found

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float:
        lost = self._lost.get(ticket.token, 1) if reply is None else 1
        if lost > 1:  # a reserve whose answer never came may have taken a lease: all of it goes
            tokens = [f"{ticket.token}/{i}" for i in range(1, lost)]
            await _call("budgets", self._release(keys=self._keys(ticket.key)[:2], args=tokens))
            del self._lost[ticket.token]  # only once Redis took it: else settled again, later
        responded = reply is not None and reply.delivery is Delivery.RESPONDED
        rate, status = (None, 0) if reply is None else (reply.rate, reply.status)
        slot = (ticket.key, ticket.party)
        lent = self._leases.get(slot)
        # Whether the lease still fits is asked only when it may not: a reply that shows less
        # than an ample budget left, or a headroom (which keeps room from what is left).
        left = None if rate is None else rate.remaining
        check = lent is not None and (lent.headroom.active or (left is not None and left < AMPLE))
        call = [
            ticket.token,
            repr(now),
            "1" if responded else "0",
            str(status),
            "" if left is None else str(left),
            "" if rate is None or rate.reset is None else str(rate.reset),
            "" if rate is None or rate.limit is None else str(rate.limit),
            "1" if reply is None else "0",
        ]
        window = None if rate is None else rate.reset
        ample = left is not None and left >= AMPLE and not check and status != 429
        if responded and ample and window is not None and self._windows.get(ticket.key) == window:
            self._behind(ticket.key, [call], SETTLE_BEHIND_SECONDS)  # nothing new in it
            return 0.0
        found = await self._send_settles(ticket.key, self._take(ticket.key), call, check)
        if window is not None and responded:
            if len(self._windows) >= MAX_LOST and ticket.key not in self._windows:
                self._windows.clear()  # many audiences' pools: known again at their next reply
            self._windows[ticket.key] = window
        paused = float(_text(found[0]))
        # A lease is never handed out into a pause (any party's), nor past what a reply says is left.
        if paused > now:
            for held in [held for held in self._leases if held[0] == ticket.key]:
                await self._release_lease(ticket.key, self._leases.pop(held, None))
        elif lent is not None and check and not lent.fits(found[1:], now) and self._leases.get(slot) is lent:
            await self._release_lease(ticket.key, self._leases.pop(slot))
        return paused


class RedisResults:
    """An `idempotency.ResultStore` in Redis, with this process's heartbeat and the check that
    Redis still holds what it kept (`scripts.BEAT`)."""

    def __init__(self, client: LeanRedis, ttl: float, lease: float, metrics: Metrics | None = None) -> None:
        self._client = client
        self._claim = client.script(scripts.CLAIM)
        self._mark = client.script(scripts.MARK)
        self._keep = client.script(scripts.KEEP)
        self._beat_script = client.script(scripts.BEAT)
        self._ttl_ms = str(int(ttl * 1000))
        self._lease = repr(lease)
        self._metrics = metrics or Metrics()
        self.owner = uuid.uuid4().hex
        self.generation = ""
        """The generation of Redis' data this process knows; "" before Redis first answers."""
        self._heartbeat = Heartbeat(self.beat, HEARTBEAT_SECONDS)

    @property
    def lost(self) -> bool:
        """Keys are refused: Redis lost what it kept, and no operator has acknowledged it yet."""
        return self.generation == LOST

    @staticmethod
    def _keys(scope: IdempotencyScope, index: int) -> list[str]:
        return [f"{PREFIX}result:{scope.text()}:{index}", GENERATION_KEY]

    async def _known(self) -> str:
        """The generation claims are made under; StoreLost while keys are refused."""
        if not self.generation:
            await self.beat()
        if self.lost:
            raise StoreLost(LOST_TEXT)
        return self.generation

    async def claim(self, scope: IdempotencyScope, index: int, digest: str, token: str) -> Claim:
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

    async def mark_sending(self, scope: IdempotencyScope, index: int, token: str) -> bool:
        generation = await self._known()
        reply = await _call("results", self._mark(keys=self._keys(scope, index), args=[token, generation]))
        if _text(reply) == "refused":
            self._found_lost()
            raise StoreLost(LOST_TEXT)
        return _text(reply) == "ok"

    async def keep(
        self, scope: IdempotencyScope, index: int, digest: str, token: str, kept: bytes | None
    ) -> None:
        args: list[str | bytes] = [
            digest,
            token,
            "0" if kept is None else "1",
            kept or b"",
            self._ttl_ms,
        ]
        await _call("results", self._keep(keys=self._keys(scope, index)[:1], args=args))

    @staticmethod
    def _outcomes_key(tenant: str, handle: str) -> str:
        return f"{PREFIX}outcome:{tenant}/{handle}"

    async def record(self, rows: Sequence[Row]) -> None:
        """Each handle's record is one hash (entry, a batch index -> result), living the TTL from
        its last write; every row written in one MULTI (one round trip), one HSET and one PEXPIRE
        a handle (a stream's rows of one flush share it: one command each, not one a row)."""
        fields: dict[str, list[str | bytes]] = {}
        for tenant, handle, entry, data in rows:  # in order: a later row of an entry wins, as in HSET
            fields.setdefault(self._outcomes_key(tenant, handle), []).extend((entry, data))
        commands: list[tuple[str | bytes | int, ...]] = [("MULTI",)]
        for key, pairs in fields.items():
            commands += [("HSET", key, *pairs), ("PEXPIRE", key, self._ttl_ms)]
        await _call("results", self._client.pipeline([*commands, ("EXEC",)]))

    async def read(self, tenant: str, handle: str) -> list[bytes]:
        found = await _call("results", self._client.call("HGETALL", self._outcomes_key(tenant, handle)))
        return list(found[1::2])  # field, value, field, value...

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
        self._heartbeat.start(on_failure)

    async def stop(self) -> None:
        await self._heartbeat.stop()
        # Gone at once: claims left behind are LOST now, not in HEARTBEAT_TTL_MS.
        with contextlib.suppress(ReplyError, OSError, TimeoutError):
            await self._client.call("DEL", f"{PREFIX}owner:{self.owner}")


async def acknowledge_loss(client: LeanRedis) -> str:
    """The operator's acknowledgement that Redis lost the keys' results: a new generation, which
    every gateway adopts within a heartbeat. What it says happened."""
    accept = client.script(scripts.ACCEPT)
    if not await accept(keys=[GENERATION_KEY], args=[LOST, uuid.uuid4().hex]):
        return "no loss to acknowledge: idempotency keys are taken"
    return (
        "acknowledged: idempotency keys are taken again; results kept before the loss are gone, "
        "so a repeat of an earlier key sends its batches again"
    )
