"""A good neighbour on a shared Braze workspace, through a real gateway and the fake Braze with
short windows: headroom left to another consumer, two tenants on one workspace, and transactional
sends beside a bulk stream (docs/budgets.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.settings import Settings
from fake_braze import FakeBrazeConfig, OtherConsumer
from servers import RedisServer, redis_server
from support import KEYS, Harness, standing_clock, start_gateway

WINDOW_LIMIT = 20


def share_workspace(harness: Harness, workspace: str, *tenants: str) -> None:
    """Put `tenants` on one workspace (with acme's Braze key) with the policy `workspace`, and reload."""
    path = Path(harness.gateway.settings.tenants.file)
    text = path.read_text()
    for tenant in tenants:
        header = f"[tenants.{tenant}]\n"
        text = text.replace(header, f'{header}workspace = "shop"\n')
        if tenant != "acme":
            text = text.replace(f'braze_api_key = "{KEYS[tenant]}"', f'braze_api_key = "{KEYS["acme"]}"')
    path.write_text(f"[workspaces.shop]\n{workspace}\n\n{text}")
    harness.gateway.reload_tenants()


def unary(count: int, first: int = 0) -> pb.SendRequest:
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(first, first + count)]
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=recipients))


async def stream(count: int) -> AsyncIterator[pb.SendStreamRequest]:
    yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
    for start in range(0, count, 500):
        recipients = [pb.Recipient(external_user_id=f"s{i}") for i in range(start, min(count, start + 500))]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))


def windows(harness: Harness) -> list[tuple[int, int, int]]:
    """(limit, the gateway's calls, others' calls) of every window of acme's key that saw a call,
    with nothing refused to anyone."""
    found = []
    for pool, view in harness.fake.limiter.budget():
        if pool == "hourly" and view.key == KEYS["acme"] and view.tally.requests:
            assert view.tally.requests_refused == 0 and view.tally.others_refused == 0, view
            found.append((view.limit, view.tally.requests, view.tally.others))
    return found


async def early_in_a_window(period: float) -> None:
    await asyncio.sleep(period - time.time() % period + 0.02)


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides"),
    [
        (
            FakeBrazeConfig(
                api_keys=frozenset(KEYS.values()),
                hourly_limit=WINDOW_LIMIT,
                hourly_window_seconds=1,
                other_consumers=(OtherConsumer(KEYS["acme"], share=0.3),),
            ),
            {"request_concurrency": 4, "max_retry_wait_seconds": 5},
        )
    ],
)
async def test_another_consumer_spending_30_percent_keeps_its_share_and_the_reserve(harness: Harness) -> None:
    """Another service takes 30% of each 1-second window (6 of 20); the workspace keeps `reserve =
    4` for it: the gateway sends at most 10 a window, and neither its calls nor theirs are refused."""
    share_workspace(harness, "reserve = 4", "acme")
    await early_in_a_window(1.0)
    reply = await harness.stub.Send(unary(50 * 30), metadata=harness.auth(), timeout=20)
    assert [r.outcome for r in reply.results] == [pb.OUTCOME_SENT] * 30
    seen = windows(harness)
    assert sum(ours for _, ours, _ in seen) == 30
    for limit, ours, others in seen:
        assert others == 6 and limit - ours - others >= 4, seen  # the reserve was never taken
    assert max(ours for _, ours, _ in seen) == 10, seen  # and everything above it was used


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides"),
    [
        (
            FakeBrazeConfig(
                api_keys=frozenset(KEYS.values()), hourly_limit=WINDOW_LIMIT, hourly_window_seconds=1
            ),
            {"request_concurrency": 8, "max_retry_wait_seconds": 5},
        )
    ],
)
async def test_two_tenants_on_one_workspace_never_exceed_its_ceiling_together(harness: Harness) -> None:
    """acme and globex send at once on workspace `shop`, `ceiling = 0.5`: 10 calls a window between
    them, whichever tenant makes them, and no 429."""
    share_workspace(harness, "ceiling = 0.5", "acme", "globex")
    await early_in_a_window(1.0)
    replies = await asyncio.gather(
        harness.stub.Send(unary(50 * 20), metadata=harness.auth("acme"), timeout=20),
        harness.stub.Send(unary(50 * 20, first=10_000), metadata=harness.auth("globex"), timeout=20),
    )
    for reply in replies:
        assert [r.outcome for r in reply.results] == [pb.OUTCOME_SENT] * 20
    assert 429 not in {call.status for call in harness.fake.calls}
    seen = windows(harness)
    assert sum(ours for _, ours, _ in seen) == 40
    assert all(ours <= 10 for _, ours, _ in seen), seen


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides"),
    [
        (
            FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=30, hourly_window_seconds=3),
            {"request_concurrency": 4, "max_retry_wait_seconds": 10},
        )
    ],
)
async def test_unary_sends_never_wait_for_budget_beside_a_bulk_stream(harness: Harness) -> None:
    """`transactional_reserve = 10` of 30 a 3-second window: a stream (bulk) of 60 calls spends 20
    a window and waits for the next; unary sends made meanwhile (transactional) each go at once."""
    share_workspace(harness, "transactional_reserve = 10", "acme")
    await early_in_a_window(3.0)
    await harness.stub.Send(unary(1, first=99_999), metadata=harness.auth(), timeout=5)  # learn the budget
    call = harness.stub.SendStream(stream(50 * 60), metadata=harness.auth(), timeout=30)

    async def trickle() -> list[float]:
        took = []
        for i in range(8):
            await asyncio.sleep(0.25)
            began = time.monotonic()
            reply = await harness.stub.Send(unary(1, first=50_000 + i), metadata=harness.auth(), timeout=5)
            took.append(time.monotonic() - began)
            assert reply.results[0].outcome == pb.OUTCOME_SENT and reply.results[0].attempts == 1
        return took

    took = await trickle()
    results = [response async for response in call]
    sent = sum(
        len(r.result.positions)
        for r in results
        if r.HasField("result") and r.result.outcome == pb.OUTCOME_SENT
    )
    assert sent == 50 * 60
    assert max(took) < 0.5, took  # no unary send waited for a window to turn (3 s)
    assert 429 not in {c.status for c in harness.fake.calls}


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides"),
    [
        (
            FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=30, hourly_window_seconds=3),
            {"request_concurrency": 4, "max_retry_wait_seconds": 10},
        )
    ],
)
async def test_send_options_priority_chooses_the_lane_unless_the_tenant_fixes_it(harness: Harness) -> None:
    """With the bulk room of a 3-second window spent (20 of 30: `transactional_reserve = 10`), a
    SendStream that asks PRIORITY_TRANSACTIONAL goes at once; a Send that asks PRIORITY_BULK waits
    for the next window; once the tenants file fixes `lane = "bulk"`, asking transactional does
    not jump the queue. A priority this gateway does not know is refused, nothing sent."""
    share_workspace(harness, "transactional_reserve = 10", "acme")
    await early_in_a_window(3.0)
    await harness.stub.Send(unary(1, first=99_999), metadata=harness.auth(), timeout=5)  # learn the budget
    bulk = harness.stub.SendStream(
        stream(50 * 40), metadata=harness.auth(), timeout=30
    )  # 40 calls: 2 windows

    async def timed(request: Any, *, streamed: bool = False) -> float:
        began = time.monotonic()
        if streamed:
            header = pb.StreamHeader(trigger=request.trigger, options=request.options)
            messages = [pb.SendStreamRequest(header=header)]
            messages.append(
                pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=request.trigger.recipients))
            )
            responses = [r async for r in harness.stub.SendStream(iter(messages), metadata=harness.auth())]
            outcomes = [r.result.outcome for r in responses if r.HasField("result")]
        else:
            outcomes = [
                r.outcome for r in (await harness.stub.Send(request, metadata=harness.auth())).results
            ]
        assert outcomes == [pb.OUTCOME_SENT]
        return time.monotonic() - began

    await asyncio.sleep(0.5)  # the stream has spent the window's bulk room (20 calls) by now
    urgent = unary(1, first=70_000)
    urgent.options.priority = pb.PRIORITY_TRANSACTIONAL
    assert await timed(urgent, streamed=True) < 0.5  # a stream, yet transactional: not held
    late = unary(1, first=70_001)
    late.options.priority = pb.PRIORITY_BULK
    assert await timed(late) > 0.5  # a Send, yet bulk: waits for the window to turn
    [r async for r in bulk]

    unknown = unary(1, first=70_002)
    unknown.options.priority = 7  # type: ignore[assignment]  # a newer client's value
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.Send(unknown, metadata=harness.auth())
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "options.priority" in (refused.value.details() or "")

    path = Path(harness.gateway.settings.tenants.file)
    path.write_text(path.read_text().replace("[tenants.acme]\n", '[tenants.acme]\nlane = "bulk"\n'))
    harness.gateway.reload_tenants()
    await early_in_a_window(3.0)
    bulk = harness.stub.SendStream(stream(50 * 40), metadata=harness.auth(), timeout=30)
    await asyncio.sleep(0.5)
    urgent = unary(1, first=70_003)
    urgent.options.priority = pb.PRIORITY_TRANSACTIONAL
    assert await timed(urgent) > 0.5  # the tenant's fixed lane wins: bulk, held like the stream
    [r async for r in bulk]
    assert 429 not in {c.status for c in harness.fake.calls}


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with redis_server() as server:
        yield server


@pytest.fixture
def settings_overrides(redis: RedisServer) -> dict[str, Any]:
    return {"redis_url": redis.url, "request_concurrency": 8, "max_retry_wait_seconds": 5}


@pytest.mark.parametrize(
    "fake_config",
    [FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=WINDOW_LIMIT, hourly_window_seconds=1)],
)
async def test_two_gateways_sharing_redis_spend_one_workspace_budget(
    harness: Harness, redis: RedisServer
) -> None:
    """The same with two gateways (replicas) keeping budgets in one Redis: acme sends through one,
    globex through the other, 10 calls a window between them."""
    share_workspace(harness, "ceiling = 0.5", "acme", "globex")
    settings = Settings.from_env(
        {},
        grpc_address="127.0.0.1:0",
        tenants_file=harness.gateway.settings.tenants.file,
        retry_base_delay_seconds=0.01,
        admin_address="127.0.0.1:0",
        shutdown_delay_seconds=0,
        redis_url=redis.url,
        request_concurrency=8,
        max_retry_wait_seconds=5,
    )
    other = await start_gateway(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        await early_in_a_window(1.0)
        replies = await asyncio.gather(
            harness.stub.Send(unary(50 * 20), metadata=harness.auth("acme"), timeout=20),
            pb_grpc.CanvasGatewayServiceStub(channel).Send(
                unary(50 * 20, first=10_000), metadata=harness.auth("globex"), timeout=20
            ),
        )
    finally:
        await channel.close()
        await other.stop(grace=0)
    for reply in replies:
        assert [r.outcome for r in reply.results] == [pb.OUTCOME_SENT] * 20
    assert 429 not in {call.status for call in harness.fake.calls}
    seen = windows(harness)
    assert sum(ours for _, ours, _ in seen) == 40
    assert all(ours <= 10 for _, ours, _ in seen), seen


STILL = standing_clock()


@pytest.mark.parametrize(
    ("fake_config", "clock", "settings_overrides"),
    [
        (
            FakeBrazeConfig(
                api_keys=frozenset(KEYS.values()),
                hourly_limit=WINDOW_LIMIT,
                other_consumers=(OtherConsumer(KEYS["acme"], share=0.3),),
                clock=STILL,
            ),
            STILL,
            {"request_concurrency": 1},
        )
    ],
)
async def test_the_metrics_tell_what_the_gateway_and_others_spent_and_what_is_kept(harness: Harness) -> None:
    share_workspace(harness, "ceiling = 0.5\nreserve = 3\ntransactional_reserve = 0.2", "acme", "globex")
    reply = await harness.stub.Send(unary(150), metadata=harness.auth(), timeout=10)
    assert [r.outcome for r in reply.results] == [pb.OUTCOME_SENT] * 3
    audience = pb.Audience(
        custom_attribute=pb.CustomAttributeFilter(custom_attribute_name="tier", comparison="exists")
    )
    broadcast = pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", broadcast=True, audience=audience))
    assert (await harness.stub.Send(broadcast, metadata=harness.auth("globex"))).results[
        0
    ].outcome == pb.OUTCOME_SENT
    registry = harness.gateway.registry

    def gauge(name: str, pool: str = "recipients", **labels: str) -> float | None:
        return registry.get_sample_value(
            f"canvas_gateway_budget_{name}", {"workspace": "shop", "pool": pool, **labels}
        )

    assert gauge("spent_calls", spender="gateway") == 3
    assert gauge("spent_calls", spender="others") == 6  # 30% of 20, from limit - remaining - ours
    assert gauge("remaining_calls") == 11
    assert gauge("reserved_calls", reserve="others") == 3
    assert gauge("reserved_calls", reserve="transactional") == 4
    assert gauge("ceiling_calls") == 10
    # The audience's pool answered the broadcast (its limit is 10): one label for every audience.
    assert gauge("spent_calls", "audience", spender="gateway") == 1
    assert gauge("remaining_calls", "audience") == 9
    assert gauge("remaining_calls", "broadcast") is None


async def named_stream(prefix: str, count: int) -> AsyncIterator[pb.SendStreamRequest]:
    yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
    for start in range(0, count, 500):
        recipients = [
            pb.Recipient(external_user_id=f"{prefix}{i}") for i in range(start, min(count, start + 500))
        ]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))


@pytest.mark.parametrize(
    ("fake_config", "settings_overrides"),
    [
        (
            FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=10, hourly_window_seconds=1),
            {"request_concurrency": 8, "max_retry_wait_seconds": 5},
        )
    ],
)
async def test_two_tenants_streams_on_one_workspace_each_get_half_of_each_window(harness: Harness) -> None:
    """acme's bulk stream starts first and globex's a second later, on one workspace of 10 calls a
    1-second window, each able to have 8 calls under way: once both wait, each has at most
    ceil(room / 2) under way, so each window is split about evenly and neither is starved (without
    the fair share, whichever stream's waiting batches wake first take up to 8 of a window's 10:
    measured [3, 7], [2, 8], [4, 6], [2, 8], ...; with it [5, 5] in every whole window)."""
    share_workspace(harness, "", "acme", "globex")
    await early_in_a_window(1.0)
    first = harness.stub.SendStream(named_stream("a", 50 * 50), metadata=harness.auth("acme"), timeout=30)
    first_results = asyncio.ensure_future(_results(first))
    await asyncio.sleep(1.5)
    second = harness.stub.SendStream(named_stream("g", 50 * 50), metadata=harness.auth("globex"), timeout=30)
    sent = [await first_results, await _results(second)]
    assert sent == [50 * 50, 50 * 50]
    assert 429 not in {call.status for call in harness.fake.calls}
    split: dict[int, list[int]] = {}
    for call in harness.fake.calls:
        tenant = 0 if call.body["recipients"][0]["external_user_id"].startswith("a") else 1
        split.setdefault(int(call.received_at), [0, 0])[tenant] += 1
    both = [counts for _, counts in sorted(split.items()) if all(counts)]
    assert len(both) >= 4, split  # the windows both streams sent in
    print("calls per window (acme, globex):", both)
    for counts in both[1:-1]:  # whole windows of contention (the first and last may be partial)
        assert sum(counts) <= 10 and min(counts) >= 4, both


async def _results(call: Any) -> int:
    return sum(
        [
            len(r.result.positions)
            async for r in call
            if r.HasField("result") and r.result.outcome == pb.OUTCOME_SENT
        ]
    )
