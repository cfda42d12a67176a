"""What metrics and logs cost: gateway CPU per recipient with them on against off, in one run.

Two gateway processes serve the same fake Braze on 127.0.0.1: one as shipped (metrics on,
INFO logs: access lines), one with CGW_METRICS_ENABLED=false and CGW_LOG_LEVEL=WARNING.
The same SendStream goes to each in turn, `--rounds` times, alternating which goes first,
and each process's CPU (utime + stime from /proc) is divided by the recipients it handled.
With two or more cores the gateways run on the last core and this client and the fake on
the others, so they do not disturb each other's caches. Machines here are noisy, so the
figure to read is the ratio of the medians from this run.

    .venv/bin/python bench/observability_cost.py --recipients 200000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from stream_throughput import fake_braze_command, free_port, stream, wait_port, write_tenants


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=500)
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    gateway_cores = {cores[-1]} if len(cores) > 1 else set(cores)
    if len(cores) > 1:
        os.sched_setaffinity(0, set(cores[:-1]))  # this client, and the fake it starts
    fake_port = free_port()
    url = f"http://127.0.0.1:{fake_port}"
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), url)
        variants = {
            "on": {"CGW_LOG_LEVEL": "INFO"},
            "off": {"CGW_METRICS_ENABLED": "false", "CGW_LOG_LEVEL": "WARNING"},
        }
        fake = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measuring
            fake_braze_command(fake_port), stdout=subprocess.DEVNULL
        )
        gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for name, extra in variants.items():
                port = free_port()
                env = {
                    **{k: v for k, v in os.environ.items() if not k.startswith("CGW_")},
                    "CGW_TENANTS_FILE": str(tenants),
                    "CGW_GRPC_ADDRESS": f"127.0.0.1:{port}",
                    "CGW_ADMIN_ADDRESS": "127.0.0.1:0",
                    "CGW_SHUTDOWN_DELAY_SECONDS": "0",
                    **extra,
                }
                process = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, "-m", "canvas_gateway_server"],
                    env=env,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=lambda: os.sched_setaffinity(0, gateway_cores),
                )
                gateways[name] = (process, f"127.0.0.1:{port}")
            await wait_port(fake_port)
            for process, target in gateways.values():
                await wait_port(int(target.rsplit(":", 1)[1]))
                await stream(target, 5_000, args.chunk, process.pid)  # warm up

            cpu: dict[str, list[float]] = {name: [] for name in variants}
            order = list(variants)
            for _ in range(args.rounds):
                for name in order:
                    process, target = gateways[name]
                    _, cpu_us, _, _ = await stream(target, args.recipients, args.chunk, process.pid)
                    cpu[name].append(cpu_us)
                order.reverse()
        finally:
            for process, _ in gateways.values():
                process.terminate()
                process.wait(timeout=30)
            fake.terminate()
            fake.wait(timeout=30)

    on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    print(f"recipients per stream            {args.recipients:>10,} x {args.rounds} rounds")
    for name in variants:
        runs = " ".join(f"{value:.2f}" for value in cpu[name])
        print(
            f"CPU per recipient, {name:<3}          {statistics.median(cpu[name]):>10.2f} us   (runs: {runs})"
        )
    print(f"ratio on / off (medians)         {on / off:>10.3f}")


if __name__ == "__main__":
    asyncio.run(main())
