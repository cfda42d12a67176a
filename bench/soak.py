"""Soak: mixed unary and stream load with random faults for a long while (10 minutes by
default), watching the gateway for leaks, stalls and lost results.

The gateway runs as its own process; the fake Braze (with random 503s and dropped
connections) and the load run in this one, so that every call the fake answered 201 can be
matched with a SENT result. Every `--sample` seconds it records the gateway's resident memory,
open file descriptors and event-loop lag (from its /metrics). At the end it prints the growth
of memory and descriptors from the first sample after warm-up to the last, the lag, and the
accounting check:
  - every request's results hold each of its recipients exactly once;
  - the dispatch_ids of SENT results are exactly those of the calls the fake answered 201,
    with the same number of recipients each.

    .venv/bin/python bench/soak.py --seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from fake_braze import FakeBraze, FakeBrazeConfig
from harness import AUTH, KEY, free_port, rss_mib, wait_port, write_tenants

OUTCOMES = {value: name.removeprefix("OUTCOME_").lower() for name, value in pb.Outcome.items()}


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    recipients: Counter[str] = field(default_factory=Counter)
    sent: dict[str, int] = field(default_factory=dict)
    """dispatch_id -> recipients, of SENT results."""
    broken: list[str] = field(default_factory=list)
    """Requests whose results did not hold each recipient exactly once."""

    def add(self, kind: str, carried: int, results: list[pb.BatchResult]) -> None:
        self.requests[kind] += 1
        positions = sorted(p for r in results for p in r.positions)
        if positions != list(range(carried)):
            self.broken.append(f"{kind} of {carried}: {len(positions)} results positions")
        for result in results:
            self.recipients[OUTCOMES[result.outcome]] += len(result.positions)
            if result.outcome == pb.OUTCOME_SENT:
                self.sent[result.braze.dispatch_id] = len(result.positions)


def recipients(start: int, count: int) -> list[pb.Recipient]:
    return [pb.Recipient(external_user_id=f"soak-{start + i}") for i in range(count)]


async def streams(
    stub: pb_grpc.CanvasGatewayServiceStub, tally: Tally, until: float, rng: random.Random
) -> None:
    while time.monotonic() < until:
        count = rng.randrange(1_000, 20_000)

        async def messages(count: int = count) -> AsyncIterator[pb.SendStreamRequest]:
            yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="soak")))
            for start in range(0, count, 500):
                chunk = recipients(start, min(500, count - start))
                yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=chunk))

        results = [
            response.result
            async for response in stub.SendStream(messages(), metadata=AUTH, timeout=600)
            if response.HasField("result")
        ]
        tally.add("stream", count, results)


async def unaries(
    stub: pb_grpc.CanvasGatewayServiceStub, tally: Tally, until: float, rng: random.Random
) -> None:
    while time.monotonic() < until:
        count = rng.randrange(1, 500)
        trigger = pb.CanvasTrigger(canvas_id="soak", recipients=recipients(0, count))
        reply = await stub.Send(pb.SendRequest(trigger=trigger), metadata=AUTH, timeout=120)
        tally.add("unary", count, list(reply.results))


def drain(fake: FakeBraze, answered: dict[str, int]) -> None:
    """Move the fake's record into `answered` (dispatch_id -> recipients), keeping memory flat."""
    calls, fake.calls[:] = list(fake.calls), []
    for call in calls:
        if call.status == 201 and call.dispatch_id:
            answered[call.dispatch_id] = len(call.body["recipients"])


def lag_buckets(text: str) -> dict[float, float]:
    buckets = {}
    for line in text.splitlines():
        if line.startswith("canvas_gateway_event_loop_lag_seconds_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def quantile(buckets: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding the q-quantile."""
    total = buckets.get(math.inf, 0.0)
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return math.inf


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples")
    parser.add_argument("--streams", type=int, default=2, help="concurrent stream callers")
    parser.add_argument("--unary", type=int, default=4, help="concurrent unary callers")
    parser.add_argument("--error-rate", type=float, default=0.01, help="share of calls the fake answers 503")
    parser.add_argument("--reset-rate", type=float, default=0.005, help="share of connections the fake drops")
    parser.add_argument("--latency-ms", type=float, default=5.0)
    args = parser.parse_args()

    fake = FakeBraze(
        FakeBrazeConfig(
            api_keys=frozenset({KEY}),
            hourly_limit=10**9,
            latency_seconds=args.latency_ms / 1000,
            error_rates={503: args.error_rate},
            reset_rate=args.reset_rate,
            seed=7,
        )
    )
    url = await fake.start("127.0.0.1", 0)
    grpc_port, admin_port = free_port(), free_port()
    answered: dict[str, int] = {}
    tally = Tally()
    samples: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "CGW_TENANTS_FILE": str(write_tenants(Path(tmp), url)),
            "CGW_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
            "CGW_ADMIN_ADDRESS": f"127.0.0.1:{admin_port}",
            "CGW_LOG_LEVEL": "ERROR",
            "CGW_WORKERS": "1",  # one process: its memory, descriptors and lag are the figures
        }
        gateway = subprocess.Popen([sys.executable, "-m", "canvas_gateway_server"], env=env)  # noqa: ASYNC220
        try:
            await wait_port(grpc_port)
            started = time.monotonic()
            until = started + args.seconds
            rng = random.Random(11)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pb_grpc.CanvasGatewayServiceStub(channel)
                load = [
                    asyncio.create_task(streams(stub, tally, until, random.Random(rng.random())))
                    for _ in range(args.streams)
                ]
                load += [
                    asyncio.create_task(unaries(stub, tally, until, random.Random(rng.random())))
                    for _ in range(args.unary)
                ]
                async with aiohttp.ClientSession() as http:
                    while time.monotonic() < until:
                        await asyncio.sleep(min(args.sample, max(0.0, until - time.monotonic())))
                        drain(fake, answered)
                        fds = len(os.listdir(f"/proc/{gateway.pid}/fd"))
                        samples.append((time.monotonic() - started, rss_mib(gateway.pid), fds))
                        elapsed, rss, _ = samples[-1]
                        done = sum(tally.recipients.values())
                        line = f"{elapsed:6.0f} s  RSS {rss:7.1f} MiB  fds {fds:4}  recipients {done:12,}"
                        print(line, flush=True)
                    await asyncio.gather(*load)
                    drain(fake, answered)
                    async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as reply:
                        lag = lag_buckets(await reply.text())
        finally:
            gateway.terminate()
            gateway.wait(timeout=60)
            await fake.stop()

    warm = next((s for s in samples if s[0] >= 60), samples[0])
    last = samples[-1]
    sent_match = answered == tally.sent
    p50, p99, top = (quantile(lag, q) * 1000 for q in (0.5, 0.99, 1.0))
    callers = f"{args.streams} stream callers, {args.unary} unary callers"
    faults = f"503 on {args.error_rate:.1%} of calls, {args.reset_rate:.1%} of connections dropped"
    each = "yes" if not tally.broken else "NO: " + "; ".join(tally.broken[:5])
    rss = f"{warm[1]:.1f} / {last[1]:.1f} MiB, ratio {last[1] / warm[1]:.2f}"
    print()
    print(f"duration                         {args.seconds:.0f} s, {callers}")
    print(f"faults                           {faults}")
    print(f"requests                         {dict(tally.requests)}")
    print(f"recipients by outcome            {dict(tally.recipients)}")
    print(f"RSS at {warm[0]:.0f} s / at end            {rss}")
    print(f"open fds at {warm[0]:.0f} s / at end       {warm[2]} / {last[2]}")
    taken = lag.get(math.inf, 0)
    print(f"event-loop lag p50 / p99 / max   <= {p50:g} / {p99:g} / {top:g} ms ({taken:.0f} samples)")
    print(f"each recipient one result        {each}")
    match = f"{'yes' if sent_match else 'NO'} ({len(tally.sent):,} / {len(answered):,} dispatch_ids)"
    print(f"SENT results = fake's 201 calls  {match}")
    if tally.broken or not sent_match:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
