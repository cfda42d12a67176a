"""Unary overhead: what a 50-recipient `Send` through the gateway costs in latency over posting
the same body straight to Braze (the fake, on 127.0.0.1), at concurrency 1 and 16.

One fake Braze and one gateway (two at concurrency 1, below). The request is built and
serialised once, before anything is timed: a `SendRequest` for the gateway and the identical
Braze JSON body (orjson) for the direct POST, so the client's own encoding is in neither
figure. The direct client is one aiohttp session with a pooled keep-alive connector; the
gateway client is one shared grpc.aio channel (gRPC multiplexes calls on it, as a service
would). Every reply is checked: 201 with a dispatch_id, or a summary with 50 recipients sent.

At each concurrency, after a warm-up, latencies are taken in blocks that alternate between the
gateway and the direct POST (which goes first alternates too), so that drift on a noisy machine
hits both; sampling stops at K calls a side or after a time bound. The figures are p50 and p99
of each and their differences (gateway - direct): the overhead, and the gateway process's CPU
per Send over its blocks. Issue 22's bars: a p50 overhead of at most 1 ms and a p99 of at most
2 ms at concurrency 1, a p50 of at most 5 ms at concurrency 16 (one worker). At concurrency 1 a
second gateway, with the compiled recipient path off (CGW_NATIVE_RECIPIENTS=false, `edge.native`),
takes its turn in the same rounds ("compiled path off: ..."): what the compiled path saves a
Send, in CPU (on / off) and in latency. Then the same at concurrency 1 on a gateway with
CGW_RESULTS_KEPT=false: what keeping every result for GetResults (in the host's file, on by
default) costs a Send.

    .venv/bin/python bench/suite.py --only unary_overhead --out -
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import grpc
import orjson
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from harness import (
    AUTH,
    CANVAS,
    CONTEXT,
    HEADERS,
    TRIGGER_PATH,
    Figure,
    another_gateway,
    cpu_seconds,
    recipient,
    stack,
)

MEASURE = "unary_overhead"
RECIPIENTS = 50
SEND = "/canvas_gateway.v1.CanvasGatewayService/Send"
TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Plan:
    """How many calls to take at one concurrency."""

    concurrency: int
    warmup: int
    """calls per worker, per side, before anything is kept"""
    block: int
    """calls per worker in one block"""
    calls: int
    """calls to keep per side (K)"""
    seconds: float
    """stop sampling after this long, even short of K (at least one block a side is taken)"""


FULL = (Plan(1, 200, 200, 2_000, 60.0), Plan(16, 20, 30, 16 * 300, 90.0))
SMOKE = (Plan(1, 5, 10, 20, 10.0), Plan(16, 1, 1, 32, 10.0))


def send_request() -> pb.SendRequest:
    trigger = pb.CanvasTrigger(canvas_id=CANVAS)
    trigger.context.update(CONTEXT)
    for i in range(RECIPIENTS):
        trigger.recipients.add(external_user_id=f"user-{i}").context.update({"order": i})
    return pb.SendRequest(trigger=trigger)


def braze_body() -> bytes:
    """The Braze JSON of the same trigger, as the gateway would send it."""
    return orjson.dumps(
        {"canvas_id": CANVAS, "context": CONTEXT, "recipients": [recipient(i) for i in range(RECIPIENTS)]}
    )


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest rank: the smallest value with at least `share` of the values at or below it."""
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


Call = Callable[[], Awaitable[None]]


async def block(call: Call, concurrency: int, per_worker: int, into: list[float] | None) -> None:
    """`concurrency` workers, each making `per_worker` calls one after another; each call's
    latency (seconds) goes to `into` (None: a warm-up, nothing kept)."""

    async def worker() -> None:
        for _ in range(per_worker):
            began = time.perf_counter()
            await call()
            elapsed = time.perf_counter() - began
            if into is not None:
                into.append(elapsed)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def sample(
    calls: Mapping[str, Call], plan: Plan, pids: Mapping[str, int] | None = None
) -> dict[str, tuple[list[float], float]]:
    """Each side's latencies at `plan.concurrency` (sorted), taken in blocks in turn, the order
    rotating each round, and the CPU seconds of its process (`pids`) during its blocks (0 without
    a pid)."""
    pids = pids or {}
    for call in calls.values():
        await block(call, plan.concurrency, plan.warmup, None)
    taken: dict[str, list[float]] = {name: [] for name in calls}
    cpu = dict.fromkeys(calls, 0.0)
    order = list(calls)
    began = time.monotonic()
    while min(len(each) for each in taken.values()) < plan.calls:
        for name in order:
            pid = pids.get(name, 0)
            before = cpu_seconds(pid) if pid else 0.0
            await block(calls[name], plan.concurrency, plan.block, taken[name])
            if pid:
                cpu[name] += cpu_seconds(pid) - before
        order = [*order[1:], order[0]]
        if time.monotonic() - began > plan.seconds:
            break
    return {name: (sorted(taken[name]), cpu[name]) for name in calls}


TARGETS = {("p50", 1): "<= 1 ms", ("p99", 1): "<= 2 ms", ("p50", 16): "<= 5 ms"}
"""Issue 22's bars on the overhead."""


def figures(plan: Plan, gateway: list[float], direct: list[float], cpu: float = 0.0) -> list[Figure]:
    c = plan.concurrency
    out: list[Figure] = []
    for label, share in (("p50", 0.50), ("p99", 0.99)):
        through, straight = percentile(gateway, share) * 1e3, percentile(direct, share) * 1e3
        target = TARGETS.get((label, c), "")
        out += [
            Figure(MEASURE, f"Send (50 recipients) {label}, concurrency {c}", through, "ms"),
            Figure(MEASURE, f"direct POST (50 recipients) {label}, concurrency {c}", straight, "ms"),
            Figure(
                MEASURE,
                f"{label} overhead (Send - direct), concurrency {c}",
                through - straight,
                "ms",
                target,
            ),
            Figure(MEASURE, f"{label} ratio Send / direct, concurrency {c}", through / straight, "x"),
        ]
    out.append(
        Figure(MEASURE, f"calls measured per side, concurrency {c}", min(len(gateway), len(direct)), "calls")
    )
    if cpu:  # what bounds latency once calls queue for the gateway's one core
        out.append(Figure(MEASURE, f"gateway CPU per Send, concurrency {c}", cpu / len(gateway) * 1e3, "ms"))
    return out


async def measure(smoke: bool) -> list[Figure]:
    plans = SMOKE if smoke else FULL
    # At concurrency 1 a second gateway with the compiled recipient path off (CGW_NATIVE_RECIPIENTS)
    # takes its turn in the same rounds: what the compiled path saves a Send, drift shared.
    found = await _measure(plans, {}, "", compare={"CGW_NATIVE_RECIPIENTS": "false"})
    # What keeping every result for GetResults (CGW_RESULTS_KEPT, on by default) costs a Send: the
    # same at concurrency 1 with it off.
    found += await _measure(plans[:1], {"CGW_RESULTS_KEPT": "false"}, "results kept off: ")
    return found


def _caller(channel: grpc.aio.Channel, request: bytes) -> Call:
    """One Send of `request` on `channel`, its reply checked."""
    send = channel.unary_unary(
        SEND, request_serializer=None, response_deserializer=pb.SendResponse.FromString
    )

    async def gateway() -> None:
        reply = await send(request, metadata=AUTH, timeout=TIMEOUT_SECONDS)
        assert reply.summary.recipients_sent == RECIPIENTS, reply.summary

    return gateway


COMPARED = "compiled path off: "


async def _measure(
    plans: tuple[Plan, ...], settings: dict[str, str], label: str, compare: dict[str, str] | None = None
) -> list[Figure]:
    """The figures of `plans` on a gateway with `settings`; with `compare`, at the first plan a
    second gateway with those settings too, its figures named COMPARED."""
    request = send_request().SerializeToString()
    body = braze_body()
    found: list[Figure] = []
    async with stack(gateway=settings) as running, contextlib.AsyncExitStack() as channels:
        connector = aiohttp.TCPConnector(limit=max(plan.concurrency for plan in plans))
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
        session = await channels.enter_async_context(
            aiohttp.ClientSession(connector=connector, timeout=timeout)
        )
        channel = await channels.enter_async_context(grpc.aio.insecure_channel(running.target))
        url = running.url + TRIGGER_PATH

        async def direct() -> None:
            async with session.post(url, data=body, headers=HEADERS) as reply:
                answer = await reply.read()
                assert reply.status == 201, (reply.status, answer)
            assert orjson.loads(answer)["dispatch_id"], answer

        sides = {"gateway": _caller(channel, request), "direct": direct}
        pids = {"gateway": running.gateway.pid}
        compared: dict[str, Call] = {}
        if compare is not None:
            target, process = await another_gateway(running, {**settings, **compare})
            other = await channels.enter_async_context(grpc.aio.insecure_channel(target))
            compared, pids["compared"] = {"compared": _caller(other, request)}, process.pid
        for plan in plans:
            taken = await sample({**sides, **(compared if plan is plans[0] else {})}, plan, pids)
            direct_calls = taken["direct"][0]
            for figure in figures(plan, *taken["gateway"][:1], direct_calls, taken["gateway"][1]):
                target = "" if label else figure.target  # the bars are the default's
                found.append(dataclasses.replace(figure, name=label + figure.name, target=target))
            if "compared" in taken:
                calls, cpu = taken["compared"]
                for figure in figures(plan, calls, direct_calls, cpu):
                    if not figure.name.startswith("direct POST"):  # the same calls as above
                        found.append(dataclasses.replace(figure, name=COMPARED + figure.name, target=""))
                found.append(_saved(plan, taken, calls))
    return found


def _saved(plan: Plan, taken: dict[str, tuple[list[float], float]], compared: list[float]) -> Figure:
    """The default gateway's CPU per Send over the compared one's, in the same rounds."""
    on, off = taken["gateway"], taken["compared"]
    ratio = (on[1] / len(on[0])) / (off[1] / len(compared)) if off[1] and on[0] else 0.0
    name = f"gateway CPU per Send, compiled path on / off, concurrency {plan.concurrency}"
    return Figure(MEASURE, name, ratio, "x")
