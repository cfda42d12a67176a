"""Rate-limit headers, the per-tenant pause and the bound on calls under way: with an injected
clock, and through a real gateway and fake Braze."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.limits import LocalLimiter, Reserved
from canvas_gateway_server.model import Batch
from canvas_gateway_server.rate_budget import (
    BULK,
    FAIR_SECONDS,
    MAX_PARTIES,
    MAX_PAUSE_SECONDS,
    NO_HEADROOM,
    RECHECK_SECONDS,
    TRANSACTIONAL,
    BudgetKey,
    BudgetStore,
    Headroom,
    Hold,
    RateBudget,
    Ticket,
    WorkspacePolicy,
    party_of,
)
from canvas_gateway_server.reply import Delivery, RateLimit, Reply, parse_rate_limit
from canvas_gateway_server.stores.failover import FailoverBudgets
from canvas_gateway_server.stores.host_budgets import HostBudgets
from canvas_gateway_server.stores.memory import LocalTable, TableBudgets
from canvas_gateway_server.stores.redis import (
    AMPLE,
    AUDIENCE_TTL_SECONDS,
    LEASE_CALLS,
    LEASE_FRESH_SECONDS,
    SETTLE_BEHIND_SECONDS,
    SETTLE_GROUP,
    RedisBudgets,
    connect,
)
from canvas_gateway_server.stores.resp import LeanRedis
from canvas_gateway_server.tenants import Tenant
from fake_braze import FakeBrazeConfig
from multidict import CIMultiDict
from servers import redis_server
from support import BUSY_LUA, EXAMPLES, FAKE_URLS, KEYS, Clock, Harness, WallClock, standing_clock

STILL = standing_clock()
WALL = WallClock()
"""Real time, for the fake and the gateway together, that a test moves to the start of a window."""
NOW = 1_750_192_867.0  # 2025-06-17T20:41:07Z, as in examples/response_429.headers.json
TENANT = Tenant(id="acme", braze_rest_url="https://rest.iad-01.braze.com", braze_api_key="k")


@pytest.fixture(params=["local", "workers", "redis"])
async def budgets(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BudgetStore]:
    """Every store keeps budgets by the same rules: the Lua scripts are Budget's methods, and a
    host's workers keep every field of Budget in their file."""
    if request.param == "local":
        yield TableBudgets()
        return
    if request.param == "workers":
        path = str(tmp_path / "budgets")
        HostBudgets.create(path)
        table = HostBudgets(path)
        yield TableBudgets(table)
        table.close()
        return
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        try:
            yield RedisBudgets(client, lease=60.0)
        finally:
            await client.aclose()


def reply(status: int, **rate: int | None) -> Reply:
    return Reply(Delivery.RESPONDED, status=status, rate=RateLimit(**rate))


def headers(name: str) -> CIMultiDict[str]:
    return CIMultiDict(json.loads((EXAMPLES / name).read_text()))


def test_braze_headers_as_recorded() -> None:
    rate = parse_rate_limit(headers("response_429.headers.json"), NOW)
    assert rate == RateLimit(limit=250_000, remaining=0, reset=1_750_194_000)
    assert (
        parse_rate_limit(headers("response_401.headers.json"), NOW) == RateLimit()
    )  # empty strings: unknown
    upper = CIMultiDict({"X-RateLimit-Remaining": "7"})  # aiohttp's headers match any case
    assert parse_rate_limit(upper, NOW).remaining == 7
    assert parse_rate_limit({"retry-after": "7"}, NOW).retry_after == 7.0
    assert parse_rate_limit({"x-ratelimit-retry-after": "3.5"}, NOW).retry_after == 3.5


def test_a_reset_that_is_not_epoch_seconds_near_now_is_unknown() -> None:
    for bad in ("1750194000000", "100000000000000000000", "9999999999", "1000000000", "soon"):
        assert parse_rate_limit({"x-ratelimit-reset": bad}, NOW).reset is None, bad
    assert parse_rate_limit({"x-ratelimit-reset": "1750194000"}, NOW).reset == 1_750_194_000


KEY = (TENANT.workspace_name, "recipients")
ONE = Reserved((Ticket(KEY),))
CALLS = f"cgw:pool:{TENANT.workspace_name}:recipients:calls"


def batch(broadcast: bool = False, audience: str = "", lane: str = "") -> Batch:
    return Batch(0, (), b"{}", broadcast, audience, lane)


async def held(
    limiter: LocalLimiter, broadcast: bool = False, tenant: Tenant = TENANT, lane: str = ""
) -> Hold:
    hold = await limiter.reserve(tenant, batch(broadcast, lane=lane))
    assert isinstance(hold, Hold), hold
    return hold


async def start(
    limiter: LocalLimiter, broadcast: bool = False, tenant: Tenant = TENANT, lane: str = ""
) -> Reserved:
    reserved = await limiter.reserve(tenant, batch(broadcast, lane=lane))
    assert isinstance(reserved, Reserved), reserved
    return reserved


async def test_a_spent_budget_pauses_until_the_reset_and_nothing_lifts_it_early(budgets: BudgetStore) -> None:
    clock = Clock(NOW)
    limiter = LocalLimiter(4, clock=clock, budgets=budgets)
    paused = await limiter.settle(await start(limiter), reply(201, remaining=0, reset=1_750_194_000))
    assert paused == 1_750_194_000
    assert await held(limiter) == Hold(1_750_194_000, spent=True)
    await limiter.settle(await start(limiter, broadcast=True), None)  # broadcasts have their own budget
    assert await limiter.settle(ONE, reply(503)) == 1_750_194_000  # no headers: says nothing
    stale = reply(201, remaining=3, reset=1_750_194_000)
    assert await limiter.settle(ONE, stale) == 1_750_194_000  # a stale reply lifts nothing
    assert await limiter.settle(ONE, reply(429, remaining=5)) == 1_750_194_000
    clock.now = 1_750_194_000.5  # the window has reset
    await limiter.settle(await start(limiter), None)


async def test_a_pause_never_outlasts_an_hour(budgets: BudgetStore) -> None:
    limiter = LocalLimiter(4, clock=lambda: NOW, budgets=budgets)
    assert (
        await limiter.settle(await start(limiter), reply(429, reset=9_999_999_999)) == NOW + MAX_PAUSE_SECONDS
    )
    assert (await held(limiter)).until == NOW + MAX_PAUSE_SECONDS


async def test_no_call_starts_that_the_calls_under_way_would_leave_without_budget(
    budgets: BudgetStore,
) -> None:
    clock = Clock(NOW)
    limiter = LocalLimiter(8, clock=clock, budgets=budgets)
    reset = 1_750_194_000
    first = await start(limiter)  # nothing known: no holding (and 1 under way)
    assert await limiter.settle(first, reply(201, remaining=2, reset=reset)) == 0
    one, two = await start(limiter), await start(limiter)  # 2 left: room for two
    hold = await held(limiter)
    assert not hold.spent and NOW < hold.until <= NOW + RECHECK_SECONDS  # ask again soon, not at the reset
    await start(limiter, broadcast=True)  # the broadcast budget is another
    await limiter.settle(one, reply(201, remaining=5, reset=reset))  # older news: ignored
    three = await start(limiter)  # a call ended: room again
    assert not (await held(limiter)).spent  # two and three under way, 2 left
    assert await limiter.settle(two, reply(201, remaining=0, reset=reset)) == reset
    assert await held(limiter) == Hold(reset, spent=True)  # spent: wait for the reset
    await limiter.settle(three, None)
    clock.now = reset + 0.5  # a new window: not known until a reply says
    four, five = await start(limiter), await start(limiter)
    await limiter.settle(five, reply(201, remaining=1, reset=reset + 3600))
    assert not (await held(limiter)).spent  # the one under way takes what is left
    await limiter.settle(four, None)
    await start(limiter)


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides", "clock"),
    [
        (
            # The fake's clock and the gateway's stand still: the budget's window cannot turn.
            FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=30, clock=STILL),
            {"request_concurrency": 8, "max_retry_wait_seconds": 0},
            STILL,
        )
    ],
)
async def test_eight_calls_in_flight_spend_a_budget_to_the_last_call_without_a_429(harness: Harness) -> None:
    users = [pb.Recipient(external_user_id=f"u{i}") for i in range(50 * 40)]  # 40 calls, budget 30
    reply = await harness.stub.Send(
        pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=users)),
        metadata=harness.auth(),
    )
    statuses = [call.status for call in harness.fake.calls]
    assert statuses.count(201) == 30, statuses  # every call the budget allowed was made
    assert 429 not in statuses
    outcomes = [(result.outcome, result.braze.http_status) for result in reply.results]
    assert outcomes.count((pb.OUTCOME_SENT, 201)) == 30
    assert outcomes.count((pb.OUTCOME_REJECTED, 0)) == 10  # answered here: nothing was sent
    resets = {r.rate_limit_reset.seconds for r in reply.results if r.outcome == pb.OUTCOME_REJECTED}
    assert resets == {(int(STILL()) // 3600 + 1) * 3600}  # the window's reset, not a re-check time
    positions = sorted(p for result in reply.results for p in result.positions)
    assert positions == list(range(len(users)))


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides"),
    [
        (
            FakeBrazeConfig(
                api_keys=frozenset(KEYS.values()),
                hourly_limit=30,
                hourly_window_seconds=1,
                latency_seconds=0.01,  # 8 calls are under way when the budget runs low
            ),
            {"request_concurrency": 8, "max_retry_wait_seconds": 5},
        )
    ],
)
async def test_held_calls_wait_and_a_job_larger_than_a_window_is_sent_without_a_429(harness: Harness) -> None:
    """A call held for the calls under way, or paused at 0, waits for a reply or the reset and is
    then sent: 70 calls over windows of 30 all end SENT, each recipient once, and no call is 429'd."""
    users = [pb.Recipient(external_user_id=f"u{i}") for i in range(50 * 70)]
    reply = await harness.stub.Send(
        pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=users)),
        metadata=harness.auth(),
        timeout=15,
    )
    statuses = [call.status for call in harness.fake.calls]
    assert statuses == [201] * 70, statuses
    assert all(result.outcome == pb.OUTCOME_SENT for result in reply.results)
    positions = sorted(p for result in reply.results for p in result.positions)
    assert positions == list(range(len(users)))


async def test_a_new_window_opens_at_the_last_known_limit_with_the_calls_under_way_counted(
    budgets: BudgetStore,
) -> None:
    """A budget smaller than the concurrency: when the window turns, only `limit` calls start,
    less those still under way, although no reply has told of the new window yet."""
    clock = Clock(NOW)
    limiter = LocalLimiter(16, clock=clock, budgets=budgets)
    reset = 1_750_192_900  # within the store's lease of 60 s: `two` is still under way
    await limiter.settle(await start(limiter), reply(201, limit=3, remaining=2, reset=reset))
    one, two = await start(limiter), await start(limiter)
    await held(limiter)
    assert await limiter.settle(one, reply(201, limit=3, remaining=0, reset=reset)) == reset
    assert await held(limiter) == Hold(reset, spent=True)

    clock.now = reset + 0.25  # the window turns with `two` still under way: 3 - 1 may start
    three, four = await start(limiter), await start(limiter)
    hold = await held(limiter)
    assert not hold.spent and hold.until == clock.now + RECHECK_SECONDS
    await limiter.settle(two, reply(201, limit=3, remaining=0, reset=reset))  # the old window's news
    five = await start(limiter)  # `two` ended: its place is free, and no more
    await held(limiter)
    await limiter.settle(three, reply(201, limit=3, remaining=1, reset=reset + 3600))
    await held(limiter)  # 1 left, four and five under way
    await limiter.settle(four, reply(201, limit=3, remaining=0, reset=reset + 3600))
    assert await held(limiter) == Hold(reset + 3600, spent=True)
    await limiter.settle(five, None)

    clock.now = reset + 3600.5  # a window turns with nothing under way: the limit, and no more
    started = [await start(limiter) for _ in range(3)]
    await held(limiter)
    for ticket in started:
        await limiter.settle(ticket, None)


async def test_replies_without_a_limit_leave_a_new_window_unbounded(budgets: BudgetStore) -> None:
    """A Braze (or a proxy) that sends no x-ratelimit-limit: a window it has not counted yet is
    not bounded, as before (only a window's own remaining is)."""
    clock = Clock(NOW)
    limiter = LocalLimiter(16, clock=clock, budgets=budgets)
    reset = 1_750_192_900
    await limiter.settle(await start(limiter), reply(201, remaining=9, reset=reset))
    tickets = [await start(limiter) for _ in range(9)]
    await held(limiter)
    for ticket in tickets:
        await limiter.settle(ticket, None)
    clock.now = reset + 0.5
    tickets = [await start(limiter) for _ in range(20)]


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides", "clock"),
    [
        (
            FakeBrazeConfig(
                api_keys=frozenset(KEYS.values()),
                hourly_limit=2,
                hourly_window_seconds=1,
                latency_seconds=0.05,
                clock=WALL,
            ),
            # One attempt each: a 429 that spent an attempt would end its batch REJECTED.
            {"request_concurrency": 4, "max_attempts": 1, "max_retry_wait_seconds": 5},
            WALL,
        )
    ],
)
async def test_a_429_that_happens_anyway_pauses_until_the_reset_and_spends_no_attempt(
    harness: Harness,
) -> None:
    """Another program on the same Braze key spends the window first: the gateway's first call
    (it knows nothing of the budget yet, so it asks alone) is answered 429 with the reset. Every
    batch then waits for it, the next windows each start 2, and all 4 end SENT."""
    WALL.skip_to(1)  # early in a window of the fake's (1 s): its clock and the gateway's go there
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                f"{FAKE_URLS[id(harness.fake)]}/canvas/trigger/send",
                json={"canvas_id": "c", "recipients": [{"external_user_id": "other"}]},
                headers={"Authorization": f"Bearer {KEYS['acme']}"},
            ) as spent:
                assert spent.status == 201
    users = [pb.Recipient(external_user_id=f"u{i}") for i in range(50 * 4)]
    reply = await harness.stub.Send(
        pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=users)),
        metadata=harness.auth(),
        timeout=15,
    )
    assert [result.outcome for result in reply.results] == [pb.OUTCOME_SENT] * 4
    statuses = [call.status for call in harness.fake.calls]
    assert statuses == [201, 201, 429, 201, 201, 201, 201], statuses
    assert sorted(p for result in reply.results for p in result.positions) == list(range(len(users)))
    assert [result.attempts for result in reply.results].count(2) == 1  # the 429, then its call


class CountingStore:
    """A BudgetStore that counts the settles it passes to the store it wraps."""

    def __init__(self, store: BudgetStore) -> None:
        self.store = store
        self.settles = 0

    async def reserve(self, key: BudgetKey, now: float, headroom: Headroom = NO_HEADROOM) -> Ticket | Hold:
        return await self.store.reserve(key, now, headroom)

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float:
        self.settles += 1
        return await self.store.settle(ticket, reply, now)


async def test_settles_redis_did_not_take_are_made_once_it_answers_by_one_task_that_backs_off() -> None:
    """Calls that ended while Redis was away are released as soon as it is back, not at the end
    of their lease (60 s here); meanwhile 200 failed settles cost a few tries, not 200 a second.
    At most `capacity` settles are kept: past them the oldest are left to their lease."""
    async with redis_server(persistent=True) as server:  # the reservations outlive its restart
        client = connect(server.url, 0.2)
        counting = CountingStore(RedisBudgets(client, lease=60.0))
        store = FailoverBudgets(counting, TableBudgets(), capacity=150)
        try:
            now = time.time()
            first = await store.reserve(KEY, now)
            assert isinstance(first, Ticket)
            await store.settle(first, reply(201), now)  # replies without a limit: nothing bounds it
            found = [await store.reserve(KEY, now) for _ in range(200)]
            tickets = [t for t in found if isinstance(t, Ticket) and t.shared]
            assert len(tickets) == 200
            await server.stop()
            assert await asyncio.gather(*(store.settle(t, None, now) for t in tickets)) == [0.0] * 200
            # Each settle asked Redis once; the backlog's task may have tried once more already
            # (its first try is 0.1 s after the first failure, and 200 failures can take longer).
            assert counting.settles >= 201
            await asyncio.sleep(1.0)
            assert counting.settles - 201 <= 5  # 0.1 s, doubling: one task, one try at a time
            await server.start()
            assert isinstance(await store.reserve(KEY, time.time()), Ticket)  # Redis answers: settle now
            async with asyncio.timeout(2):  # the new call, and the 50 oldest left to their lease
                while await client.call("ZCARD", CALLS) > 51:
                    await asyncio.sleep(0.01)
            assert store.unsettled == 0
            assert await client.call("ZCARD", CALLS) == 51
        finally:
            await store.stop()
            await client.aclose()


async def test_a_reserve_whose_answer_was_lost_is_released_once_redis_answers() -> None:
    """A reserve that timed out may still be made by Redis (the script runs once Redis can): it is
    released as soon as Redis answers again, not counted as under way for every replica until its
    lease (60 s here) ends."""
    async with redis_server() as server:
        client, admin = connect(server.url, 0.2), connect(server.url, 5.0)
        # No timed retry (60 s): the lost reserve is released when Redis answers the next one, and
        # is seen made in Redis meanwhile, however slow the machine (a retry after 0.1 s raced the poll).
        store = FailoverBudgets(RedisBudgets(client, lease=60.0), TableBudgets(), retry_seconds=(60.0, 60.0))
        calls = CALLS
        try:
            first = await store.reserve(KEY, time.time())
            assert isinstance(first, Ticket)
            await store.settle(first, reply(201), time.time())  # no limit: nothing bounds it

            async def keep_redis_busy() -> None:
                await admin.call("EVAL", BUSY_LUA, 0, 800)

            for _ in range(5):  # until the reserve reaches Redis while it is busy
                busy = asyncio.create_task(keep_redis_busy())  # Redis busy for 0.8 s
                await asyncio.sleep(0.1)  # the script has started, most often; else once more
                lost = await store.reserve(KEY, time.time())  # times out: this process's own (fail open)
                assert isinstance(lost, Ticket)
                await busy
                if not lost.shared:
                    break
                await store.settle(lost, reply(201), time.time())  # it beat the script: settle it
            assert isinstance(lost, Ticket) and not lost.shared, "no reserve reached Redis while it was busy"
            async with asyncio.timeout(5):
                while await admin.call("ZCARD", calls) == 0:  # Redis made it once the pause ended
                    await asyncio.sleep(0.05)
            live = await store.reserve(KEY, time.time())  # Redis answers: the lost one goes now
            assert isinstance(live, Ticket) and live.shared
            async with asyncio.timeout(3):
                while await admin.call("ZCARD", calls) > 1:
                    await asyncio.sleep(0.01)
            assert store.unsettled == 0
        finally:
            await store.stop()
            await client.aclose()
            await admin.aclose()


async def test_a_budget_never_answered_lets_one_call_ask_first(budgets: BudgetStore) -> None:
    """Even the first window is not overspent by a fleet that starts together: until Braze has
    answered once, one call is under way at a time."""
    limiter = LocalLimiter(16, clock=lambda: NOW, budgets=budgets)
    first = await start(limiter)
    hold = await held(limiter)
    assert not hold.spent and hold.until == NOW + RECHECK_SECONDS
    await start(limiter, broadcast=True)  # each budget asks for itself
    await limiter.settle(first, None)  # no call was made: still never answered
    second = await start(limiter)
    await held(limiter)
    await limiter.settle(second, reply(503))  # a 5xx without headers (an edge) tells nothing
    third = await start(limiter)
    await held(limiter)
    await limiter.settle(third, reply(201))  # Braze's own success without a limit: unbounded
    for _ in range(10):
        await start(limiter)


def tenant_with(policy: WorkspacePolicy, tenant_id: str = "acme", workspace: str = "shop") -> Tenant:
    return Tenant(
        id=tenant_id,
        braze_rest_url=TENANT.braze_rest_url,
        braze_api_key="k",
        allow_broadcast=True,
        workspace=workspace,
        policy=policy,
    )


RESET = 1_750_192_900


async def test_the_gateway_leaves_the_reserve_to_others_and_backs_off_when_they_spend(
    budgets: BudgetStore,
) -> None:
    """`reserve = 10`: the gateway starts calls only while what everyone left (x-ratelimit-remaining)
    stays above 10, counting its calls under way; others spending lowers what it may take."""
    tenant = tenant_with(WorkspacePolicy(reserve_calls=10))
    limiter = LocalLimiter(32, clock=lambda: NOW, budgets=budgets)
    first = await start(limiter, tenant=tenant)
    await limiter.settle(first, reply(201, limit=100, remaining=15, reset=RESET))
    under_way = [await start(limiter, tenant=tenant) for _ in range(5)]  # 15 - 10
    assert not (await held(limiter, tenant=tenant)).spent
    # One answer later, others have spent 2 more: 12 left, 4 under way, room for 2: none starts.
    await limiter.settle(under_way.pop(), reply(201, limit=100, remaining=12, reset=RESET))
    await held(limiter, tenant=tenant)
    for reserved in under_way:
        await limiter.settle(reserved, None)
    two = [await start(limiter, tenant=tenant) for _ in range(2)]
    await held(limiter, tenant=tenant)
    for reserved in two:
        await limiter.settle(reserved, reply(201, limit=100, remaining=10, reset=RESET))
    assert await held(limiter, tenant=tenant) == Hold(RESET, spent=True)  # the reserve is theirs


async def test_the_gateway_spends_no_more_than_its_ceiling_in_a_window(budgets: BudgetStore) -> None:
    """`ceiling = 0.5` of a limit of 20: 10 calls a window, whatever Braze says is left."""
    now = [NOW]
    tenant = tenant_with(WorkspacePolicy(ceiling_share=0.5))
    limiter = LocalLimiter(32, clock=lambda: now[0], budgets=budgets)
    await limiter.settle(await start(limiter, tenant=tenant), reply(201, limit=20, remaining=19, reset=RESET))
    for _ in range(12):  # reservations released without a call (a broadcast's audience held) count none
        await limiter.settle(await start(limiter, tenant=tenant), None)
    nine = [await start(limiter, tenant=tenant) for _ in range(9)]
    assert not (await held(limiter, tenant=tenant)).spent  # 10 started: calls are under way
    for left, reserved in enumerate(nine):
        await limiter.settle(reserved, reply(201, limit=20, remaining=18 - left, reset=RESET))
    assert await held(limiter, tenant=tenant) == Hold(RESET, spent=True)  # 10 left, none of them ours
    now[0] = RESET + 0.5  # a new window: 10 more, and no more
    [await start(limiter, tenant=tenant) for _ in range(10)]
    await held(limiter, tenant=tenant)


async def test_bulk_calls_leave_the_transactional_reserve(budgets: BudgetStore) -> None:
    """`transactional_reserve = 0.2` of 20: bulk calls stop 4 above what is left, transactional
    ones may take everything; once bulk has had its part, transactional calls still start."""
    tenant = tenant_with(WorkspacePolicy(transactional_share=0.2))
    limiter = LocalLimiter(32, clock=lambda: NOW, budgets=budgets)
    await limiter.settle(await start(limiter, tenant=tenant), reply(201, limit=20, remaining=10, reset=RESET))
    bulk = [await start(limiter, tenant=tenant, lane=BULK) for _ in range(6)]
    assert not (await held(limiter, tenant=tenant, lane=BULK)).spent
    urgent = [await start(limiter, tenant=tenant, lane=TRANSACTIONAL) for _ in range(4)]
    await held(limiter, tenant=tenant, lane=TRANSACTIONAL)  # all 10 under way
    for reserved in bulk:
        await limiter.settle(reserved, reply(201, limit=20, remaining=4, reset=RESET))
    for reserved in urgent:
        await limiter.settle(reserved, None)
    assert await held(limiter, tenant=tenant, lane=BULK) == Hold(RESET, spent=True)
    [await start(limiter, tenant=tenant) for _ in range(4)]  # unary sends: transactional


async def test_tenants_of_one_workspace_spend_one_budget(budgets: BudgetStore) -> None:
    limiter = LocalLimiter(32, clock=lambda: NOW, budgets=budgets)
    shop, outlet = tenant_with(WorkspacePolicy(), "acme"), tenant_with(WorkspacePolicy(), "globex")
    other = tenant_with(WorkspacePolicy(), "initech", workspace="")  # named after its URL and key
    assert other.workspace_name.startswith("auto-") and "k" not in other.workspace_name[5:]
    await limiter.settle(await start(limiter, tenant=shop), reply(201, limit=9, remaining=2, reset=RESET))
    await start(limiter, tenant=outlet)
    await start(limiter, tenant=shop)
    await held(limiter, tenant=outlet)
    await held(limiter, tenant=shop)
    await start(limiter, tenant=other)  # another workspace: its own budget


async def test_an_audience_at_its_limit_pauses_its_own_broadcasts_only(budgets: BudgetStore) -> None:
    """A broadcast reserves the workspace's broadcast pool and its audience's; the reply's
    x-ratelimit-limit tells which answered (10 or less: the audience's), and only that one learns
    its headers. A reply without a limit tells of both (the safe reading)."""
    tenant = tenant_with(WorkspacePolicy())
    limiter = LocalLimiter(32, clock=lambda: NOW, budgets=budgets)

    async def broadcast(audience: str) -> Reserved | Hold:
        return await limiter.reserve(tenant, batch(True, audience))

    first = await broadcast("a1")
    assert isinstance(first, Reserved) and len(first.tickets) == 2
    # The tenant's broadcast budget is not paused (metrics): one audience is.
    assert await limiter.settle(first, reply(201, limit=10, remaining=0, reset=RESET)) == 0
    assert await broadcast("a1") == Hold(RESET, spent=True)
    second = await broadcast("a2")  # another audience goes on
    assert isinstance(second, Reserved)
    assert await limiter.settle(second, reply(201, limit=250, remaining=0, reset=RESET)) == RESET
    assert await broadcast("a3") == Hold(RESET, spent=True)
    await start(limiter, tenant=tenant)  # recipient calls have their own pool
    later = RESET + 30
    other = tenant_with(WorkspacePolicy(), "globex", workspace="outlet")
    found = await limiter.reserve(other, batch(True, "a1"))
    assert isinstance(found, Reserved)
    await limiter.settle(found, reply(429, reset=later))  # no limit: both pools pause
    assert await limiter.reserve(other, batch(True, "a9")) == Hold(later, spent=True)


async def test_a_held_audience_releases_the_broadcast_pool_it_reserved_first(budgets: BudgetStore) -> None:
    tenant = tenant_with(WorkspacePolicy())
    limiter = LocalLimiter(32, clock=lambda: NOW, budgets=budgets)
    first = await limiter.reserve(tenant, batch(True, "a1"))
    assert isinstance(first, Reserved)
    await limiter.settle(first, reply(201, limit=10, remaining=1, reset=RESET))
    busy = await limiter.reserve(tenant, batch(True, "a1"))  # a1 has room for one
    assert isinstance(busy, Reserved)
    assert isinstance(await limiter.reserve(tenant, batch(True, "a1")), Hold)
    # The broadcast pool (unbounded: its replies carried no limit of its own) holds nothing back.
    assert isinstance(await limiter.reserve(tenant, batch(True, "a2")), Reserved)


def test_this_process_keeps_a_bounded_number_of_pools() -> None:
    table = LocalTable(capacity=2)
    for pool in ("audience:1", "audience:2", "audience:1", "audience:3"):
        table.update(("shop", pool), lambda budget: budget.reserve(NOW))
    assert len(table) == 2
    # audience:2 was the least recently used: it is known again from nothing.
    assert table.update(("shop", "audience:2"), lambda budget: budget.under_way) == 0
    assert table.update(("shop", "audience:3"), lambda budget: budget.under_way) == 1


async def test_audience_pools_expire_sooner_in_redis() -> None:
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        try:
            store = RedisBudgets(client, lease=60.0)
            assert isinstance(await store.reserve(("shop", "audience:ab"), NOW), Ticket)
            assert isinstance(await store.reserve(("shop", "recipients"), NOW), Ticket)
            assert 0 < await client.call("TTL", "cgw:pool:shop:audience:ab") <= AUDIENCE_TTL_SECONDS
            assert await client.call("TTL", "cgw:pool:shop:recipients") > AUDIENCE_TTL_SECONDS
        finally:
            await client.aclose()


async def test_a_new_window_a_reply_tells_of_first_counts_only_the_calls_under_way(
    budgets: BudgetStore,
) -> None:
    """`ceiling = 3`: the window turns with a call under way and a reply tells of the new one before
    any call asks: the gateway's count in it is that call, not the old window's 3."""
    now = [NOW]
    tenant = tenant_with(WorkspacePolicy(ceiling_calls=3))
    limiter = LocalLimiter(32, clock=lambda: now[0], budgets=budgets)
    await limiter.settle(await start(limiter, tenant=tenant), reply(201, limit=20, remaining=19, reset=RESET))
    one, two = await start(limiter, tenant=tenant), await start(limiter, tenant=tenant)
    await held(limiter, tenant=tenant)
    now[0] = RESET + 1
    await limiter.settle(one, reply(201, limit=20, remaining=19, reset=RESET + 60))
    [await start(limiter, tenant=tenant) for _ in range(2)]  # `two` and these: 3
    await held(limiter, tenant=tenant)
    await limiter.settle(two, None)


async def test_tenants_in_one_lane_each_get_their_share_while_it_is_contended(budgets: BudgetStore) -> None:
    """Room for 10: a lone tenant's stream takes all of it; once a second tenant of the same lane
    waits, the first starts nothing more until it has fewer than ceil(10 / 2) under way, and what
    it frees goes to the second, up to 5 each. Another lane's tenant is not counted; a tenant that
    stops asking is forgotten after FAIR_SECONDS."""
    now = [NOW]
    limiter = LocalLimiter(32, clock=lambda: now[0], budgets=budgets)
    shop, outlet = tenant_with(WorkspacePolicy(), "acme"), tenant_with(WorkspacePolicy(), "globex")
    otp = tenant_with(WorkspacePolicy(), "initech")
    await limiter.settle(await start(limiter, tenant=shop), reply(201, limit=20, remaining=10, reset=RESET))
    first = [await start(limiter, tenant=shop, lane=BULK) for _ in range(10)]  # uncontended: all
    await held(limiter, tenant=outlet, lane=BULK)  # waits: the lane is contended
    second: list[Reserved] = []
    for _ in range(5):
        await limiter.settle(first.pop(), None)
        await held(limiter, tenant=shop, lane=BULK)  # asks first, but has more than its share
        second.append(await start(limiter, tenant=outlet, lane=BULK))
    await limiter.settle(first.pop(), None)  # 4 and 5 under way: the first's turn
    await held(limiter, tenant=outlet, lane=BULK)
    first.append(await start(limiter, tenant=shop, lane=BULK))  # 5 and 5
    await held(limiter, tenant=otp, lane=TRANSACTIONAL)  # the room is full
    await limiter.settle(second.pop(), None)
    await held(limiter, tenant=shop, lane=BULK)  # its share
    # Alone in its lane: the bulk lane's waiting tenants do not bound it.
    second.append(await start(limiter, tenant=otp, lane=TRANSACTIONAL))
    for reserved in second:
        await limiter.settle(reserved, None)
    now[0] += FAIR_SECONDS + 0.1  # the second tenant has gone quiet: the first may take it all
    [await start(limiter, tenant=shop, lane=BULK) for _ in range(5)]  # 5 + 5
    await held(limiter, tenant=shop, lane=BULK)


def test_a_record_tracks_a_bounded_number_of_parties() -> None:
    """Past MAX_PARTIES parties active at once, a new one is outside the fair share (not capped,
    still counted under way); a quiet party's slot is reused."""
    budget = RateBudget(reset=RESET, left=100, limit=100)
    for tenant in range(MAX_PARTIES + 1):
        assert budget.reserve(NOW, Headroom(party=party_of(str(tenant), BULK))) is None
    assert len(budget.parties) == MAX_PARTIES and budget.under_way == MAX_PARTIES + 1
    for party in list(budget.parties):
        budget.settle(None, NOW, party.party)
    assert budget.reserve(NOW + FAIR_SECONDS + 1, Headroom(party=party_of("late", BULK))) is None
    assert [p.party for p in budget.parties] == [party_of("late", BULK)]


async def evalsha_calls(client: LeanRedis) -> int:
    """How many scripts Redis has run (INFO commandstats)."""
    stats = (await client.call("INFO", "commandstats")).decode()
    found = re.search(r"cmdstat_evalsha:calls=(\d+)", stats)
    return int(found.group(1)) if found else 0


@contextlib.asynccontextmanager
async def ample_pool() -> AsyncIterator[tuple[LeanRedis, RedisBudgets]]:
    """A Redis whose pool Braze said has 999 calls left (room for leases), and a store on it."""
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        try:
            store = RedisBudgets(client, lease=60.0)
            first = await store.reserve(KEY, NOW)
            assert isinstance(first, Ticket)  # never answered: one call asks first
            await store.settle(first, reply(201, limit=1000, remaining=999, reset=RESET), NOW)
            yield client, store
        finally:
            await client.aclose()


async def test_a_pool_with_room_lends_a_process_several_calls_each_under_way_in_redis() -> None:
    """Room for 1,000: one reserve takes LEASE_CALLS calls, each counted under way and ours in Redis
    at once; this process hands out the others without a round trip, and a pause ends the lease."""
    async with ample_pool() as (client, store):
        before = await evalsha_calls(client)
        found = [await store.reserve(KEY, NOW) for _ in range(LEASE_CALLS)]
        tickets = [t for t in found if isinstance(t, Ticket) and t.shared]
        assert len(tickets) == LEASE_CALLS
        assert await evalsha_calls(client) - before == 1  # one script for LEASE_CALLS calls
        assert await client.call("ZCARD", CALLS) == LEASE_CALLS
        assert [t.ours for t in tickets] == list(range(2, LEASE_CALLS + 2))
        assert isinstance(await store.reserve(KEY, NOW), Ticket)  # the next lease
        assert await client.call("ZCARD", CALLS) == 2 * LEASE_CALLS
        spent = reply(429, limit=1000, remaining=0, reset=RESET)
        assert await store.settle(tickets[0], spent, NOW) == RESET
        assert await store.reserve(KEY, NOW) == Hold(RESET, spent=True)  # not the lease's calls
        async with asyncio.timeout(2):  # ...which are released, not left to their lease
            while await client.call("ZCARD", CALLS) > LEASE_CALLS:
                await asyncio.sleep(0.01)


async def test_calls_lent_and_not_handed_out_are_released_soon_and_are_not_ours() -> None:
    async with ample_pool() as (client, store):
        one = await store.reserve(KEY, NOW)
        assert isinstance(one, Ticket)
        base = CALLS.removesuffix(":calls")
        assert int(await client.call("HGET", base, "ours")) == 1 + LEASE_CALLS
        await asyncio.sleep(LEASE_FRESH_SECONDS)
        async with asyncio.timeout(2):
            while await client.call("ZCARD", CALLS) > 1:  # only the call handed out
                await asyncio.sleep(0.01)
        assert int(await client.call("HGET", base, "ours")) == 2
        assert await client.call("ZRANGE", CALLS, 0, -1) == [one.token.encode()]
        await store.settle(one, reply(201, limit=1000, remaining=997, reset=RESET), NOW)
        two = await store.reserve(KEY, NOW)  # another lease...
        assert isinstance(two, Ticket)
        await store.stop()  # ...whose calls not handed out go back at once at shutdown
        assert await client.call("ZRANGE", CALLS, 0, -1) == [two.token.encode()]


@pytest.mark.parametrize("tenants", ["one tenant", "two tenants"])
@pytest.mark.parametrize("room", [1, 2, 5, 8, 31, 32, 33, 47, 100])
async def test_two_replicas_leasing_one_pool_start_exactly_what_it_allows(room: int, tenants: str) -> None:
    """At the edges of a lease (room below, at and above LEASE_SPREAD * LEASE_CALLS): two replicas
    that reserve in turn, settling nothing, get exactly `room` calls between them, never more;
    for one tenant or two of one lane (the fair share: a lease only while no other is active)."""
    parties = [Headroom(party=party_of("acme", BULK)), Headroom(party=party_of("globex", BULK))]
    if tenants == "one tenant":
        parties[1] = parties[0]
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        try:
            one, two = RedisBudgets(client, lease=60.0), RedisBudgets(client, lease=60.0)
            first = await one.reserve(KEY, NOW)
            assert isinstance(first, Ticket)
            await one.settle(first, reply(201, limit=1000, remaining=room, reset=RESET), NOW)
            granted = 0
            while True:
                pairs = zip((one, two), parties, strict=True)
                found = [await replica.reserve(KEY, NOW, party) for replica, party in pairs]
                if all(isinstance(f, Hold) for f in found):
                    break
                granted += sum(isinstance(f, Ticket) for f in found)
                assert granted <= room
            assert granted == room
            assert await client.call("ZCARD", CALLS) == room
        finally:
            await client.aclose()


async def test_two_lanes_keep_a_lease_each_and_a_pause_ends_both() -> None:
    """A transactional and a bulk party on one pool (not rivals: other lanes) each hold a lease,
    side by side: taking turns costs a reserve script per LEASE_CALLS calls each, not one a call.
    A pause one of them is told of ends the other's lease too."""
    quick, bulk = Headroom(party=party_of("acme", TRANSACTIONAL)), Headroom(party=party_of("acme", BULK))
    async with ample_pool() as (client, store):
        before = await evalsha_calls(client)
        turns = [quick, bulk] * (LEASE_CALLS // 2) + [quick] * (LEASE_CALLS // 2)
        found = [await store.reserve(KEY, NOW, party) for party in turns]  # bulk keeps half its lease
        tickets = [t for t in found if isinstance(t, Ticket)]
        assert len(tickets) == len(turns)
        assert await evalsha_calls(client) - before == 2  # a lease each
        spent = reply(429, limit=1000, remaining=0, reset=RESET)
        assert await store.settle(tickets[0], spent, NOW) == RESET  # quick's call is told
        assert await store.reserve(KEY, NOW, bulk) == Hold(RESET, spent=True)  # not bulk's lease


async def test_settles_that_tell_redis_nothing_new_go_together_and_those_that_narrow_it_at_once() -> None:
    """Replies with an ample budget left (AMPLE) in a window Redis was told of are settled behind:
    within SETTLE_BEHIND_SECONDS, those of a pool in one script, their calls counted under way until
    then (holding others back, never letting more start). A reply that leaves less goes at once,
    with those behind first, so the next reserve already sees it. So does a new window's first."""
    async with ample_pool() as (client, store):
        base = CALLS.removesuffix(":calls")
        tickets = [await store.reserve(KEY, NOW) for _ in range(LEASE_CALLS)]  # one lease
        assert all(isinstance(t, Ticket) for t in tickets)
        before = await evalsha_calls(client)
        for i, ticket in enumerate(tickets[:5]):
            ample = reply(201, limit=1000, remaining=990 - i, reset=RESET)
            assert await store.settle(cast(Ticket, ticket), ample, NOW) == 0.0
        assert await client.call("ZCARD", CALLS) == LEASE_CALLS  # queued before the script: not yet
        async with asyncio.timeout(2):
            while await client.call("ZCARD", CALLS) > LEASE_CALLS - 5:
                await asyncio.sleep(0.001)
        assert await evalsha_calls(client) - before == 1  # one script for the five
        assert int(await client.call("HGET", base, "left")) == 986
        behind = reply(201, limit=1000, remaining=985, reset=RESET)
        assert await store.settle(cast(Ticket, tickets[5]), behind, NOW) == 0.0
        narrow = reply(201, limit=1000, remaining=AMPLE - 1, reset=RESET)
        await store.settle(cast(Ticket, tickets[6]), narrow, NOW)  # at once, with the one behind
        assert await client.call("ZRANGE", CALLS, 0, -1) == [cast(Ticket, tickets[7]).token.encode()]
        assert int(await client.call("HGET", base, "left")) == AMPLE - 1
        turned = reply(201, limit=1000, remaining=999, reset=RESET + 3600)  # a new window: at once
        await store.settle(cast(Ticket, tickets[7]), turned, NOW)
        assert await client.call("ZCARD", CALLS) == 0
        assert int(await client.call("HGET", base, "reset")) == RESET + 3600


async def test_settles_sent_behind_go_at_shutdown_and_again_when_redis_did_not_take_them() -> None:
    """Settles behind are sent when the store stops, not left to their calls' lease (60 s); and
    when Redis does not answer (stopped, then back with its data) they are kept and sent again,
    SETTLE_GROUP at most to a script, none lost (two groups failing together once lost the first)."""
    async with redis_server(persistent=True) as server:
        client = connect(server.url, 0.5)
        try:
            store = RedisBudgets(client, lease=60.0, lease_calls=1)  # no lease: only settles here
            first = await store.reserve(KEY, NOW)
            assert isinstance(first, Ticket)
            await store.settle(first, reply(201, limit=1000, remaining=999, reset=RESET), NOW)
            ample = reply(201, limit=1000, remaining=990, reset=RESET)
            tickets = [await store.reserve(KEY, NOW) for _ in range(3)]
            for ticket in tickets:
                await store.settle(cast(Ticket, ticket), ample, NOW)
            await store.stop()
            assert await client.call("ZCARD", CALLS) == 0
            tickets = [await store.reserve(KEY, NOW) for _ in range(SETTLE_GROUP + 44)]  # two scripts
            await client.call("SET", "written-before-the-stop", "1")
            await server.stop()
            for ticket in tickets:
                await store.settle(cast(Ticket, ticket), ample, NOW)
            await asyncio.sleep(SETTLE_BEHIND_SECONDS + 0.1)  # sent, and not taken
            await server.start()
            assert await client.call("GET", "written-before-the-stop") == b"1"  # the calls too
            async with asyncio.timeout(10):  # (their lease is 60 s)
                while await client.call("ZCARD", CALLS) > 0:
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
