"""The promise at its edges, over many seeds: every recipient gets exactly one truthful final
result, nobody gets the Canvas twice, and Braze is never asked for more than it allows.

Each seed builds a fleet of gateway processes sharing one Redis (with an append-only file, as
deployed) in front of one fake Braze whose window allows fewer calls than the fleet can start at
once, with random 5xx answers and dropped connections. A caller streams recipients under an
idempotency key; while it does, one or two things go wrong at a random moment: a gateway is
SIGKILLed (and another started), Redis stalls past the gateways' timeout, or Redis restarts. The
caller then resends the same request, its map entries (`Struct` fields at every depth) and fields in
another random order on the wire, to a random live gateway, until every batch has a final result.

What must hold, checked against the fake's own record:
- every position has exactly one final result, and every repeat tells the same story (a batch
  once final is replayed with the same outcome and dispatch id; no "differs" for a resend);
- nobody is sent the Canvas twice; a SENT result's recipients were sent once, with its dispatch id;
- UNKNOWN only for a batch whose call reached Braze, or one a killed gateway had marked as leaving
  (once the call had its connection) and died before the bytes left: such a batch says so (its
  gateway stopped), and a kill leaves no more of them than the calls the budget lets be under way
  at once (LIMIT). Several can share that moment: marks issued in one loop turn go to Redis in one
  write, and each request is written a loop turn or two after its mark's reply;
- Braze answered 429 to no call (the fleet never starts more calls than a window allows).

`make test` runs INVARIANT_SEEDS seeds (default 3) starting at INVARIANT_FIRST_SEED; `make soak`
runs more.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import redis.asyncio as aioredis
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.keeping import LOST_TEXT
from fake_braze import FakeBraze, FakeBrazeConfig
from servers import RedisServer, Replica, redis_server, start_replica, stop_process
from support import FAKE_URLS, KEYS, TOKENS, tenants_toml
from wire import wire

FIRST_SEED = int(os.environ.get("INVARIANT_FIRST_SEED", "20261206"))
SEEDS = range(FIRST_SEED, FIRST_SEED + int(os.environ.get("INVARIANT_SEEDS", "3")))
REPLICAS = 2
STREAMS = 3
"""Keyed streams at once, each to a random gateway."""
CONCURRENCY = 8
"""Calls each stream may have in flight: the fleet can start 24 at once..."""
LIMIT = 12
"""...against 12 calls a window at the fake."""
WINDOW = 1
AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)
METHOD = "/canvas_gateway.v1.CanvasGatewayService/SendStream"
GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
"""How a stream ends when its gateway dies under it: resent with the key."""


@dataclass
class Fleet:
    replicas: list[Replica]
    redis: RedisServer
    tenants: Path
    settings: dict[str, str]
    killed: int = 0
    events: list[str] = field(default_factory=list)

    async def start(self) -> None:
        async with aiohttp.ClientSession() as session:
            self.replicas.append(await start_replica(self.tenants, session, **self.settings))

    async def kill(self, rng: random.Random) -> None:
        victim = self.replicas.pop(rng.randrange(len(self.replicas)))
        await stop_process(victim.process, signal.SIGKILL)
        self.killed += 1
        await self.start()

    async def stall_redis(self, seconds: float) -> None:
        client = aioredis.Redis.from_url(self.redis.url)
        try:
            await client.client_pause(int(seconds * 1000), all=True)
        finally:
            await client.aclose()


@pytest.fixture
def fake_config(request: pytest.FixtureRequest) -> FakeBrazeConfig:
    return FakeBrazeConfig(
        api_keys=frozenset(KEYS.values()),
        hourly_limit=LIMIT,
        hourly_window_seconds=WINDOW,
        error_rates={500: 0.03, 503: 0.03},
        reset_rate=0.03,
        latency_seconds=0.05,
        seed=request.node.callspec.params["seed"],
    )


@pytest.fixture
async def fleet(fake: FakeBraze, tmp_path: Path) -> AsyncIterator[Fleet]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    settings = {
        "CGW_REQUEST_CONCURRENCY": str(CONCURRENCY),
        "CGW_REDIS_FAILURE": "closed",  # never over budget, Redis or not
        "CGW_REDIS_TIMEOUT_SECONDS": "0.2",
        "CGW_MAX_RETRY_WAIT_SECONDS": "5",
        "CGW_SHUTDOWN_DELAY_SECONDS": "0",
    }
    async with redis_server(persistent=True) as redis:
        fleet = Fleet([], redis, tenants, {**settings, "CGW_REDIS_URL": redis.url})
        try:
            await asyncio.gather(*(fleet.start() for _ in range(REPLICAS)))
            yield fleet
        finally:
            await asyncio.gather(*(stop_process(r.process, signal.SIGKILL) for r in fleet.replicas))


def context(rng: random.Random, keys: int, depth: int = 2) -> dict[str, Any]:
    """A context of `keys` keys, with nested objects and lists of objects."""
    out: dict[str, Any] = {}
    for k in range(keys):
        pick = rng.randrange(4) if depth else 0
        if pick == 0:
            out[f"k{k}"] = rng.choice([f"v{k}", k, k + 0.5, True, None])
        elif pick == 1:
            out[f"k{k}"] = context(rng, rng.randint(2, 5), depth - 1)
        elif pick == 2:
            out[f"k{k}"] = [context(rng, 3, depth - 1), k]
        else:
            out[f"k{k}"] = f"text-{k}"
    return out


def request(seed: int, stream: int, count: int) -> list[pb.SendStreamRequest]:
    rng = random.Random(seed * 100 + stream)
    trigger = pb.CanvasTrigger(canvas_id=f"c-{seed}")
    trigger.context.update(context(rng, 12))
    key = pb.SendOptions(idempotency_key=f"inv-{seed}-{stream}")
    users = []
    for i in range(count):
        user = pb.Recipient(external_user_id=f"s{stream}-u{i}")
        if i % 7 == 0:
            user.context.update(context(rng, rng.randint(2, 6), 1))
        users.append(user)
    chunks = [pb.RecipientChunk(recipients=users[i : i + 200]) for i in range(0, count, 200)]
    header = pb.StreamHeader(trigger=trigger, options=key)
    return [pb.SendStreamRequest(header=header), *(pb.SendStreamRequest(chunk=c) for c in chunks)]


async def send(
    replica: Replica, messages: list[pb.SendStreamRequest], rng: random.Random
) -> list[pb.BatchResult]:
    """One SendStream with the messages' map entries in a random order on the wire."""
    order = random.Random(rng.random())
    raw = [wire(message, order) for message in messages]
    async with grpc.aio.insecure_channel(replica.address) as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=lambda b: b, response_deserializer=pb.SendStreamResponse.FromString
        )
        return [m.result async for m in call(iter(raw), metadata=AUTH, timeout=60) if m.HasField("result")]


async def chaos(fleet: Fleet, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 2)):
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        what = rng.choice(["kill", "stall", "restart"])
        fleet.events.append(what)
        if what == "kill":
            await fleet.kill(rng)
        elif what == "stall":
            await fleet.stall_redis(rng.uniform(0.3, 1.0))
        else:
            await fleet.redis.restart()


@dataclass
class Caller:
    """One keyed stream and what it was told: the first final result of each batch."""

    stream: int
    messages: list[pb.SendStreamRequest]
    count: int
    final: dict[int, pb.BatchResult] = field(default_factory=dict)
    told: Counter[str] = field(default_factory=Counter)

    def users(self, result: pb.BatchResult) -> tuple[str, ...]:
        return tuple(f"s{self.stream}-u{p}" for p in result.positions)

    async def attempt(self, fleet: Fleet, rng: random.Random) -> None:
        try:
            got = await send(rng.choice(fleet.replicas), self.messages, rng)
        except grpc.aio.AioRpcError as error:
            if error.code() not in GONE:
                raise
            return
        for result in got:
            self.told[pb.Outcome.Name(result.outcome)] += 1
            assert result.code != grpc.StatusCode.FAILED_PRECONDITION.value[0], result.status_message
            if result.outcome == pb.OUTCOME_NOT_ATTEMPTED:
                continue
            kept = self.final.setdefault(result.batch_index, result)
            assert (kept.outcome, kept.braze.dispatch_id, list(kept.positions)) == (
                result.outcome,
                result.braze.dispatch_id,
                list(result.positions),
            ), "a final result is told again the same way"

    async def finish(self, fleet: Fleet, rng: random.Random) -> None:
        """Resend until every batch is final, then once more: all of it replayed."""
        for _ in range(40):
            if len(self.final) == -(-self.count // 50):
                break
            await asyncio.sleep(0.5)
            await self.attempt(fleet, rng)
        assert len(self.final) == -(-self.count // 50), (fleet.events, self.told)
        before = sum(self.told.values())
        await self.attempt(fleet, rng)
        assert sum(self.told.values()) - before in (0, -(-self.count // 50))


@pytest.mark.parametrize("seed", SEEDS)
async def test_exactly_once_and_never_over_budget(seed: int, fleet: Fleet, fake: FakeBraze) -> None:
    rng = random.Random(seed)
    callers = []
    for stream in range(STREAMS):
        count = rng.randint(300, 700)
        callers.append(Caller(stream, request(seed, stream, count), count))

    async with asyncio.timeout(150):
        await asyncio.gather(chaos(fleet, rng), *(c.attempt(fleet, rng) for c in callers))
        await asyncio.gather(*(c.finish(fleet, rng) for c in callers))

    sent = Counter(r["external_user_id"] for call in fake.sent() for r in call.body["recipients"])
    assert max(sent.values()) == 1, "nobody is sent the Canvas twice"
    dispatch = {
        tuple(r["external_user_id"] for r in c.body["recipients"]): c.dispatch_id for c in fake.sent()
    }
    arrived = {tuple(r["external_user_id"] for r in orjson.loads(raw)["recipients"]) for raw in fake.arrived}
    unknown_unsent: list[pb.BatchResult] = []
    told_sent: set[str] = set()
    told_unknown: set[str] = set()
    for caller in callers:
        final = caller.final.values()
        assert sorted(p for r in final for p in r.positions) == list(range(caller.count))
        for result in final:
            users = caller.users(result)
            if result.outcome == pb.OUTCOME_SENT:
                assert dispatch.get(users) == result.braze.dispatch_id
                told_sent.update(users)
            else:
                assert result.outcome == pb.OUTCOME_UNKNOWN, result
                told_unknown.update(users)
                if users not in arrived:
                    unknown_unsent.append(result)
    assert told_sent <= set(sent) <= told_sent | told_unknown, "every result tells the truth"
    # Marked, then its gateway was killed before the bytes left: each marked call held one of the
    # calls the budget lets be under way at once.
    never_sent = [r.status_message for r in unknown_unsent]
    assert set(never_sent) <= {LOST_TEXT}, ("UNKNOWN though never sent", never_sent, fleet.events)
    assert len(never_sent) <= LIMIT * fleet.killed, ("UNKNOWN though never sent", never_sent, fleet.events)
    assert fake.status_counts[429] == 0, ("over budget", fleet.events, fake.status_counts)
