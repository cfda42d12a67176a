"""What metrics, logs and traces cost: gateway CPU per recipient with them on against off, in one run.

Gateway processes serve the same fake Braze on 127.0.0.1: one as shipped (metrics on, INFO
logs: access lines, tracing off), one with CGW_METRICS_ENABLED=false and CGW_LOG_LEVEL=WARNING,
and two as shipped plus OpenTelemetry tracing exported over OTLP/HTTP to a sink in this process
(which answers and drops), sampling every trace and 1% of them.
The same SendStream goes to each in turn, `rounds` times, alternating which goes first, and
each process's CPU (utime + stime from /proc) is divided by the recipients it handled.
With two or more cores the gateways run on the last core and this client and the fake on
the others, so they do not disturb each other's caches. Machines here are noisy, so the
figure to read is the ratio of the medians from this run.

Tracing off is not a variant (no build lacks its code): its cost is the code it leaves on the
path, timed here in-process (`off_path_seconds`: per batch, the dispatcher's extra await and the
exemplar lookup; per RPC a few `is None` tests, nothing per recipient) and set beside the CPU per
recipient of the shipped gateway.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from harness import (
    Figure,
    encoded_chunks,
    fake_braze_command,
    free_port,
    pinned_gateway,
    stream,
    wait_port,
    write_tenants,
)

MEASURE = "observability_cost"
VARIANTS = {
    "on": {"CGW_LOG_LEVEL": "INFO"},
    "off": {"CGW_METRICS_ENABLED": "false", "CGW_LOG_LEVEL": "WARNING"},
    "traced": {"CGW_LOG_LEVEL": "INFO", "OTEL_TRACES_SAMPLER": "always_on"},
    "traced_1pct": {
        "CGW_LOG_LEVEL": "INFO",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.01",
    },
}
TRACED = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
BATCH = 50


async def off_path_seconds(n: int = 200_000) -> float:
    """What tracing's code costs per batch when it is off: `Dispatcher.send`'s extra await of
    `_send`, and `tracing.exemplar()` on the Braze histogram (a context lookup)."""
    from canvas_gateway_server.tracing import exemplar

    async def inner() -> None:
        return None

    async def wrapped() -> None:
        await inner()

    async def calls(call: Callable[[], Awaitable[None]]) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await call()
        return time.perf_counter() - started

    direct = [await calls(inner) for _ in range(3)]
    through = [await calls(wrapped) for _ in range(3)]
    extra_await = max(0.0, (min(through) - min(direct)) / n)
    started = time.perf_counter()
    for _ in range(n):
        exemplar()
    return extra_await + (time.perf_counter() - started) / n


async def otlp_sink(port: int) -> web.AppRunner:
    """An OTLP/HTTP endpoint that answers every export with an empty success and keeps nothing."""

    async def export(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def measure(smoke: bool) -> list[Figure]:
    n, rounds, size = (2_000, 1, 500) if smoke else (200_000, 5, 500)
    cores = sorted(os.sched_getaffinity(0))
    gateway_cores = {cores[-1]} if len(cores) > 1 else set(cores)
    client_cores = set(cores[:-1]) if len(cores) > 1 else set(cores)
    fake_port, sink_port = free_port(), free_port()
    url = f"http://127.0.0.1:{fake_port}"
    sink = await otlp_sink(sink_port)
    otlp = {**TRACED, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"}
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), url)
        os.sched_setaffinity(0, client_cores)  # this client, and the fake it starts
        fake = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measuring
            fake_braze_command(fake_port), stdout=subprocess.DEVNULL
        )
        gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for name, extra in VARIANTS.items():
                extra = {**otlp, **extra} if name.startswith("traced") else extra
                gateways[name] = await pinned_gateway(tenants, extra, gateway_cores)
            await wait_port(fake_port)
            parts = encoded_chunks(n, size)
            for process, target in gateways.values():
                await stream(target, 5_000, size, process.pid)  # warm up

            cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
            order = list(VARIANTS)
            for _ in range(rounds):
                for name in order:
                    process, target = gateways[name]
                    run = await stream(target, n, size, process.pid, chunks=parts)
                    cpu[name].append(run.gateway_cpu_us)
                order.reverse()
        finally:
            os.sched_setaffinity(0, set(cores))
            for process, _ in gateways.values():
                process.terminate()
                process.wait(timeout=30)
            fake.terminate()
            fake.wait(timeout=30)
            await sink.cleanup()

    on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    traced, sampled = statistics.median(cpu["traced"]), statistics.median(cpu["traced_1pct"])
    off_code = await off_path_seconds() * 1e6 / BATCH  # us per recipient
    return [
        Figure(MEASURE, f"CPU per recipient, metrics and logs on (median of {rounds})", on, "us"),
        Figure(MEASURE, f"CPU per recipient, metrics and logs off (median of {rounds})", off, "us"),
        Figure(MEASURE, "CPU on / off", on / off, "x", "<= 1.05"),
        Figure(MEASURE, f"CPU per recipient, traced, every trace sampled (median of {rounds})", traced, "us"),
        Figure(MEASURE, f"CPU per recipient, traced, 1% sampled (median of {rounds})", sampled, "us"),
        Figure(MEASURE, "CPU traced 100% / tracing off", traced / on, "x"),
        Figure(MEASURE, "CPU traced 1% / tracing off", sampled / on, "x"),
        Figure(MEASURE, "tracing off: its code per recipient (in-process timing)", off_code * 1000, "ns"),
        Figure(
            MEASURE, "tracing off: its code's share of CPU per recipient", off_code / on * 100, "%", "<= 1%"
        ),
    ]
