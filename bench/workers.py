"""All cores: SendStream throughput with 1 worker and with one per core, over several connections.

The kernel hands each new connection to one worker (SO_REUSEPORT), so the load is
several streams (8), each on a connection of its own (a channel with a local subchannel
pool: by default gRPC shares one connection among channels to the same address). For each
worker count, in one run: recipients/s over all streams, the gateway's CPU per recipient (all
its processes), and how the connections fell on the workers (the busiest worker's share of
the RPCs, from the supervisor's merged /metrics).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
from canvas_gateway_server.workers import cores
from harness import Figure, cpu_seconds, encoded_chunks, stack, stream
from prometheus_client.parser import text_string_to_metric_families

MEASURE = "workers"


async def busiest_share(admin: str) -> float:
    """The largest share of SendStream RPCs any one worker handled."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{admin}/metrics") as reply:
        text = await reply.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "grpc_server_handled":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["grpc_method"] == "SendStream":
                    worker = sample.labels.get("worker", "0")
                    counts[worker] = counts.get(worker, 0) + sample.value
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


async def run(workers: int, n: int, connections: int, size: int) -> tuple[float, float, float, float]:
    """(recipients/s, gateway CPU us per recipient, busiest worker's share of streams, cores
    busy: the CPU the gateway, the fake Braze and this client used over the wall time)."""
    per = n // connections
    async with stack({"CGW_WORKERS": str(workers)}) as running:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(running.target, options=options) for _ in range(connections)]
        try:
            parts = [encoded_chunks(per, size, offset=i * per) for i in range(connections)]
            # Warm up every connection (and so every worker it reached), then measure.
            await asyncio.gather(
                *(stream(running.target, 500, size, running.gateway.pid, channel=c) for c in channels)
            )
            cpu, began = cpu_seconds(running.gateway.pid), time.perf_counter()
            others = cpu_seconds(running.fake.pid) + time.process_time()
            await asyncio.gather(
                *(
                    stream(running.target, per, size, running.gateway.pid, chunks=part, channel=channel)
                    for part, channel in zip(parts, channels, strict=True)
                )
            )
            elapsed = time.perf_counter() - began
            used = cpu_seconds(running.gateway.pid) - cpu
            others = cpu_seconds(running.fake.pid) + time.process_time() - others
            share = await busiest_share(running.admin)
        finally:
            for channel in channels:
                await channel.close()
    return per * connections / elapsed, used / (per * connections) * 1e6, share, (used + others) / elapsed


async def measure(smoke: bool) -> list[Figure]:
    n, connections, size = (4_000, 4, 200) if smoke else (400_000, 8, 500)
    many = max(2, cores())
    one_rate, one_cpu, _, one_busy = await run(1, n, connections, size)
    many_rate, many_cpu, share, many_busy = await run(many, n, connections, size)
    even = f"even: {100 / many:.0f}%"
    return [
        Figure(MEASURE, f"SendStream, 1 worker, {connections} connections", one_rate, "recipients/s"),
        Figure(MEASURE, f"SendStream, {many} workers, {connections} connections", many_rate, "recipients/s"),
        Figure(MEASURE, f"throughput {many} workers / 1 worker", many_rate / one_rate, "x"),
        Figure(MEASURE, "cores busy (gateway + fake Braze + client), 1 worker", one_busy, "cores"),
        Figure(MEASURE, f"cores busy (gateway + fake Braze + client), {many} workers", many_busy, "cores"),
        Figure(MEASURE, "gateway CPU per recipient, 1 worker", one_cpu, "us"),
        Figure(MEASURE, f"gateway CPU per recipient, {many} workers", many_cpu, "us"),
        Figure(MEASURE, f"busiest worker's share of {2 * connections} streams", share * 100, "%", even),
    ]
