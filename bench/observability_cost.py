"""What metrics and logs cost: gateway CPU per recipient with them on against off, in one run.

Two gateway processes serve the same fake Braze on 127.0.0.1: one as shipped (metrics on,
INFO logs: access lines), one with CGW_METRICS_ENABLED=false and CGW_LOG_LEVEL=WARNING.
The same SendStream goes to each in turn, `rounds` times, alternating which goes first, and
each process's CPU (utime + stime from /proc) is divided by the recipients it handled.
With two or more cores the gateways run on the last core and this client and the fake on
the others, so they do not disturb each other's caches. Machines here are noisy, so the
figure to read is the ratio of the medians from this run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import (
    Figure,
    encoded_chunks,
    fake_braze_command,
    free_port,
    gateway_env,
    stream,
    wait_port,
    wait_ready,
    write_tenants,
)

MEASURE = "observability_cost"
VARIANTS = {
    "on": {"CGW_LOG_LEVEL": "INFO"},
    "off": {"CGW_METRICS_ENABLED": "false", "CGW_LOG_LEVEL": "WARNING"},
}


async def measure(smoke: bool) -> list[Figure]:
    n, rounds, size = (2_000, 1, 500) if smoke else (200_000, 5, 500)
    cores = sorted(os.sched_getaffinity(0))
    gateway_cores = {cores[-1]} if len(cores) > 1 else set(cores)
    client_cores = set(cores[:-1]) if len(cores) > 1 else set(cores)
    fake_port = free_port()
    url = f"http://127.0.0.1:{fake_port}"
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), url)
        os.sched_setaffinity(0, client_cores)  # this client, and the fake it starts
        fake = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measuring
            fake_braze_command(fake_port), stdout=subprocess.DEVNULL
        )
        gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for name, extra in VARIANTS.items():
                port, admin = free_port(), free_port()
                process = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, "-m", "canvas_gateway_server"],
                    env=gateway_env(tenants, port, extra, admin),
                    stderr=subprocess.DEVNULL,
                    preexec_fn=lambda: os.sched_setaffinity(0, gateway_cores),
                )
                gateways[name] = (process, f"127.0.0.1:{port}")
                await wait_ready(f"127.0.0.1:{admin}")
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

    on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    return [
        Figure(MEASURE, f"CPU per recipient, metrics and logs on (median of {rounds})", on, "us"),
        Figure(MEASURE, f"CPU per recipient, metrics and logs off (median of {rounds})", off, "us"),
        Figure(MEASURE, "CPU on / off", on / off, "x", "<= 1.05"),
    ]
