"""Replicas: a bulk load through HAProxy to 1, 2 and 3 gateway replicas sharing Redis, against
one replica reached directly without Redis, in one run.

The load is 6 SendStreams at once, each on a channel (and so a connection) of its own, against one
fake Braze that answers every call after 20 ms, as a real Braze keeps calls in flight for a while:
the calls under way set the pace as much as the CPU. Each stream asks for 8 calls at once
(CGW_REQUEST_CONCURRENCY) and each gateway process allows a tenant 32 (CGW_TENANT_CONCURRENCY).

Each replica is a gateway process (CGW_WORKERS=1) with CGW_REDIS_URL pointing at one
redis-server, so every call reserves and settles the tenant's budget there. HAProxy runs with the
deployment's own config (deploy/haproxy/haproxy.cfg, through tests/servers.py), which balances
each gRPC call: the 6 streams spread 3-3 over 2 replicas and 2-2-2 over 3. The setups:

  baseline                     one more gateway process, reached directly: no balancer, no Redis
  Redis, no HAProxy            replica 1 reached directly: the cost of Redis alone
  HAProxy + Redis, N replicas  through the balancer, to replicas 1..N

Every setup is started once; then, in each round, the same streams (pre-encoded chunks) go through
each setup in turn, the order rotating from round to round so that drift on a noisy machine hits
them all. Every result must be SENT and every recipient must get one. The figures are medians
over the rounds: recipients/s and its ratio to the baseline (each round's ratio, taken in that
round), the cores busy (CPU of the gateways, HAProxy, redis-server, the fake Braze and this client,
over the wall time), the gateways' CPU per recipient (all replicas of the setup), HAProxy's and
redis-server's CPU per recipient, and replica 3's share of the 3-replica streams (from its /metrics).

This machine has 2 cores, shared by the replicas, the fake Braze, the client, HAProxy and Redis:
more replicas add no CPU here, so the ratios show what the balancer and Redis path costs (and
what more replicas' calls in flight toward Braze win back), not a scale-out gain.

    .venv/bin/python bench/suite.py --only replicas --out -
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from harness import (
    Figure,
    cpu_seconds,
    encoded_chunks,
    fake_braze_command,
    free_port,
    gateway_env,
    stream,
    wait_port,
    wait_ready,
    write_tenants,
)

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from servers import haproxy, redis_server, stop_process, streams_handled  # tests/ is on the path now

MEASURE = "replicas"
STREAMS = 6
LATENCY_MS = 20.0
CHUNK = 500
BASELINE = "baseline"


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    target: str
    admin: str


@dataclass
class Setup:
    """One way to reach the gateway: `target`, served by `gateways`, through `balancer` (a pid)."""

    name: str
    title: str
    target: str
    gateways: list[Gateway]
    redis: int | None = None
    """redis-server's pid, when the gateways use it"""
    balancer: int | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    """cores: CPU of every process over the wall time"""
    cpu: dict[str, list[float]] = field(default_factory=dict)
    """CPU per recipient (us) of the gateways (all replicas), HAProxy and Redis"""

    def clear(self) -> None:
        self.rates, self.ratios, self.busy, self.cpu = [], [], [], {}


async def start_gateway(started: AsyncExitStack, tenants: Path, settings: dict[str, str]) -> Gateway:
    """A gateway process, stopped when `started` closes; not yet ready."""
    port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "canvas_gateway_server"),
        env=gateway_env(tenants, port, settings, admin_port),
    )
    started.push_async_callback(stop_process, process)
    return Gateway(process, f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}")


async def run(setup: Setup, per: int, parts: Sequence[Sequence[bytes]], fake: int) -> float:
    """The streams once through `setup` (every result SENT): recipients/s; its cores busy and
    CPU per recipient are kept in `setup`."""
    groups = {
        "gateways": [each.process.pid for each in setup.gateways],
        "haproxy": [setup.balancer] if setup.balancer else [],
        "redis": [setup.redis] if setup.redis else [],
        "fake": [fake],
    }
    before = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}
    client, began = time.process_time(), time.perf_counter()
    await asyncio.gather(
        *(
            stream(setup.target, per, CHUNK, groups["gateways"][0], chunks=part, channel=channel)
            for part, channel in zip(parts, setup.channels, strict=True)
        )
    )
    elapsed = time.perf_counter() - began
    client = time.process_time() - client
    used = {name: sum(cpu_seconds(pid) for pid in pids) - before[name] for name, pids in groups.items()}
    n = per * len(parts)
    setup.rates.append(n / elapsed)
    setup.busy.append((sum(used.values()) + client) / elapsed)
    for name in ("gateways", "haproxy", "redis"):
        if groups[name]:
            setup.cpu.setdefault(name, []).append(used[name] / n * 1e6)
    return n / elapsed


async def measure(smoke: bool) -> list[Figure]:
    per, rounds = (300, 1) if smoke else (15_000, 5)
    parts = [encoded_chunks(per, CHUNK, offset=i * per) for i in range(STREAMS)]
    fake_port = free_port()
    options = [("grpc.use_local_subchannel_pool", 1)]
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), f"http://127.0.0.1:{fake_port}")
        async with AsyncExitStack() as started:
            fake = await asyncio.create_subprocess_exec(
                *fake_braze_command(fake_port, LATENCY_MS), stdout=asyncio.subprocess.DEVNULL
            )
            started.push_async_callback(stop_process, fake)
            redis = await started.enter_async_context(redis_server())
            assert redis.process is not None
            await wait_port(fake_port)
            direct = await start_gateway(started, tenants, {})
            replicas = [await start_gateway(started, tenants, {"CGW_REDIS_URL": redis.url}) for _ in range(3)]
            await asyncio.gather(*(wait_ready(each.admin) for each in (direct, *replicas)))
            setups = [
                Setup(BASELINE, "1 replica directly, no Redis (baseline)", direct.target, [direct]),
                Setup(
                    "Redis, no HAProxy",
                    "1 replica directly, with Redis",
                    replicas[0].target,
                    replicas[:1],
                    redis.process.pid,
                ),
            ]
            for count in (1, 2, 3):
                balancer = await started.enter_async_context(
                    haproxy([(r.target, r.admin) for r in replicas[:count]])
                )
                name = f"HAProxy + Redis, {count} replica{'s' if count > 1 else ''}"
                setups.append(
                    Setup(
                        name,
                        name,
                        balancer.address,
                        replicas[:count],
                        redis.process.pid,
                        balancer.process.pid,
                    )
                )
            for setup in setups:
                setup.channels = [
                    grpc.aio.insecure_channel(setup.target, options=options) for _ in range(STREAMS)
                ]
                started.push_async_callback(asyncio.gather, *(c.close() for c in setup.channels))

            # Warm up every channel, replica and balancer connection, then measure.
            warm = [encoded_chunks(100, 50, offset=i * 100) for i in range(STREAMS)]
            for setup in setups:
                await run(setup, 100, warm, fake.pid)
                setup.clear()
            three = setups[-1]
            before = await asyncio.gather(*(streams_handled(g.admin) for g in three.gateways))
            for turn in range(rounds):
                shift = turn % len(setups)
                rates = {s.name: await run(s, per, parts, fake.pid) for s in setups[shift:] + setups[:shift]}
                for setup in setups:
                    setup.ratios.append(rates[setup.name] / rates[BASELINE])
            after = await asyncio.gather(*(streams_handled(g.admin) for g in three.gateways))
            # Replica 3 serves only the 3-replica balancer (replicas 1 and 2 serve the others too).
            share = (after[2] - before[2]) / (rounds * STREAMS)

    figures: list[Figure] = []
    for setup in setups:
        rate = statistics.median(setup.rates)
        figures.append(Figure(MEASURE, f"{STREAMS} SendStreams, {setup.title}", rate, "recipients/s"))
        if setup.name != BASELINE:
            ratio = statistics.median(setup.ratios)
            figures.append(Figure(MEASURE, f"throughput / baseline, {setup.name}", ratio, "x"))
    for setup in setups:
        busy = statistics.median(setup.busy)
        figures.append(Figure(MEASURE, f"cores busy (every process), {setup.name}", busy, "cores"))
    for setup in setups:
        gateways = statistics.median(setup.cpu["gateways"])
        figures.append(
            Figure(MEASURE, f"gateway CPU per recipient (all replicas), {setup.name}", gateways, "us")
        )
    for what, name in (("haproxy", "HAProxy"), ("redis", "Redis")):
        pooled = statistics.median(value for setup in setups for value in setup.cpu.get(what, []))
        figures.append(
            Figure(MEASURE, f"{name} CPU per recipient (median of every run through it)", pooled, "us")
        )
    figures.append(
        Figure(MEASURE, "replica 3's share of the 3-replica streams", share * 100, "%", "even: 33%")
    )
    return figures
