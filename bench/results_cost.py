"""What keeping every result costs (`outcomes`, CGW_RESULTS_KEPT) for unkeyed requests: gateway CPU
per batch with results kept against not kept, in one run, and the memory a kept batch takes.

Two gateway processes serve the same fake Braze on 127.0.0.1, as shipped (their results in the
host's SQLite file, as a gateway on a port keeps them) but one with CGW_RESULTS_KEPT=false. The
same unkeyed SendStream goes to each in turn, `rounds` times, alternating which goes first, and
each process's CPU (utime + stime from /proc) is divided by the batches it handled (50
recipients each). With two or more cores the gateways run on the last core and this client and
the fake on the others. Machines here are noisy: the figure to read is the ratio of the medians.

In-process beside it: what `Recorder.record` costs per batch of 50 into this process's memory
(`LocalResults`, one process on port 0), and the bytes a kept batch holds there (tracemalloc).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import orjson
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

MEASURE = "results_cost"
VARIANTS = {"kept": {"CGW_RESULTS_KEPT": "true"}, "not_kept": {"CGW_RESULTS_KEPT": "false"}}
BATCH = 50


async def in_process(n: int) -> tuple[float, float]:
    """Microseconds per `Recorder.record` of a SENT batch of 50 (written behind, flushed), and the
    bytes each keeps in memory."""
    from canvas_gateway_server.context import RequestContext
    from canvas_gateway_server.model import Batch, BatchResult, Code, Outcome
    from canvas_gateway_server.outcomes import Recorder
    from canvas_gateway_server.stores.memory import LocalResults
    from canvas_gateway_server.tenants import Tenant

    body = orjson.dumps(
        {
            "canvas_id": "c",
            "recipients": [{"context": {"n": i}, "external_user_id": f"user-{i}"} for i in range(BATCH)],
        }
    )
    batch = Batch(0, tuple(range(BATCH)), body)
    result = BatchResult(
        0, batch.positions, Outcome.SENT, Code.OK, dispatch_id="d" * 32, http_status=201, attempts=1
    )
    tenant = Tenant("acme", "http://127.0.0.1", "key")
    contexts = [RequestContext.of(tenant, request_id=f"{i:032x}") for i in range(n)]
    timed = Recorder(LocalResults(86_400.0, n * 2, 900.0))
    started = time.perf_counter()
    for context in contexts:
        timed.record(context, result, batch)
    await timed.flush()
    elapsed = time.perf_counter() - started
    held_by = Recorder(LocalResults(86_400.0, n * 2, 900.0))  # measured apart: tracemalloc slows all
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for context in contexts:
        held_by.record(context, result, batch)
    await held_by.flush()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return elapsed / n * 1e6, held / n


async def measure(smoke: bool) -> list[Figure]:
    n, rounds, size = (2_000, 1, 500) if smoke else (100_000, 5, 500)
    cores = sorted(os.sched_getaffinity(0))
    gateway_cores = {cores[-1]} if len(cores) > 1 else set(cores)
    client_cores = set(cores[:-1]) if len(cores) > 1 else set(cores)
    fake_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), f"http://127.0.0.1:{fake_port}")
        os.sched_setaffinity(0, client_cores)
        fake = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measuring
            fake_braze_command(fake_port), stdout=subprocess.DEVNULL
        )
        gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for name, extra in VARIANTS.items():
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
                    cpu[name].append(run.gateway_cpu_us * BATCH)  # per batch of 50
                order.reverse()
        finally:
            os.sched_setaffinity(0, set(cores))
            for process, _ in gateways.values():
                process.terminate()
                process.wait(timeout=30)
            fake.terminate()
            fake.wait(timeout=30)

    kept, not_kept = statistics.median(cpu["kept"]), statistics.median(cpu["not_kept"])
    record_us, held = await in_process(200 if smoke else 20_000)
    return [
        Figure(
            MEASURE,
            f"CPU per batch of 50, unkeyed, results kept (SQLite file; median of {rounds})",
            kept,
            "us",
        ),
        Figure(
            MEASURE, f"CPU per batch of 50, unkeyed, results not kept (median of {rounds})", not_kept, "us"
        ),
        Figure(MEASURE, "CPU kept / not kept", kept / not_kept, "x"),
        Figure(MEASURE, "Recorder.record into memory, per batch of 50 (in-process)", record_us, "us"),
        Figure(MEASURE, "memory a kept SENT batch of 50 holds (in-process store)", held / 1024, "KB"),
    ]


if __name__ == "__main__":
    for figure in asyncio.run(measure("--smoke" in sys.argv)):
        print(f"{figure.name:<80} {figure.text()}")
