"""Callers that use every worker: a bulk send through the Python client with 1 connection and
with several (`CanvasGatewayClient(connections=N)`), against a gateway of 1 and of 2 workers.

The kernel hands each new connection to one worker (SO_REUSEPORT) and gRPC shares one
connection among the channels to an address, so a client on one connection keeps one worker
busy whatever CGW_WORKERS is; with N connections it sends N parts of the input at once, one on
each. In one run, for each worker count: recipients/s through `send_stream` (prebuilt
`pb.Recipient`s, in parts of 5,000) with 1 connection and with CONNECTIONS, and the ratios. The
fake Braze runs on a core of its own when the machine has 4 or more (its CPU affinity; the
gateway and this client share the others); on fewer, nothing is pinned and every process shares
every core, which the figures say.

    .venv/bin/python bench/suite.py --only client_connections --out -
"""

from __future__ import annotations

import os
import time

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_client import CanvasGatewayClient
from harness import CANVAS, CONTEXT, TOKEN, Figure, Stack, cpu_seconds, process_tree, stack

MEASURE = "client_connections"
CONNECTIONS = 4


def recipients(n: int) -> list[pb.Recipient]:
    made = []
    for i in range(n):
        recipient = pb.Recipient(external_user_id=f"user-{i}")
        recipient.context.update({"order": i})
        made.append(recipient)
    return made


def pin(running: Stack) -> str:
    """The fake Braze on the last core, the gateway (every worker) and this process on the
    others, when there are 4 cores or more; what was done, for the table."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 4:
        return f"not pinned: {len(cores)} cores shared by all"
    rest = set(cores[:-1])
    os.sched_setaffinity(running.fake.pid, {cores[-1]})
    for pid in (*process_tree(running.gateway.pid), os.getpid()):
        try:
            os.sched_setaffinity(pid, rest)
        except OSError:
            continue
    return f"fake Braze on core {cores[-1]} alone"


def busy(running: Stack) -> float:
    """CPU seconds the gateway (every worker), the fake Braze and this client have used."""
    return cpu_seconds(running.gateway.pid) + cpu_seconds(running.fake.pid) + time.process_time()


async def send(running: Stack, users: list[pb.Recipient], connections: int) -> tuple[float, float]:
    """(recipients/s, cores busy) of one send of `users` on `connections` connections (opened
    beforehand)."""
    target = running.target
    header = pb.CanvasTrigger(canvas_id=CANVAS)
    header.context.update(CONTEXT)
    async with CanvasGatewayClient(target, TOKEN, connections=connections) as client:
        warm = min(len(users), 50 * connections)
        async for _ in client.send_stream(header, users[:warm]):
            pass  # the first part's connection, and the gateway's first calls
        began, cpu = time.perf_counter(), busy(running)
        sent = 0
        async for response in client.send_stream(header, users):
            sent += response.summary.recipients_sent if response.HasField("summary") else 0
        elapsed = time.perf_counter() - began
        cores = (busy(running) - cpu) / elapsed
    assert sent == len(users), (sent, len(users))
    return len(users) / elapsed, cores


async def measure(smoke: bool) -> list[Figure]:
    n = 300 if smoke else 100_000
    users = recipients(n)
    rates: dict[tuple[int, int], float] = {}
    cores: dict[tuple[int, int], float] = {}
    pinned = ""
    mine = os.sched_getaffinity(0)
    for workers in (1, 2):
        async with stack({"CGW_WORKERS": str(workers)}) as running:
            pinned = pin(running)
            try:
                for connections in (1, CONNECTIONS):
                    rates[workers, connections], cores[workers, connections] = await send(
                        running, users, connections
                    )
            finally:
                os.sched_setaffinity(0, mine)
    figures = [
        Figure(
            MEASURE,
            f"Python client, {w} worker{'s' if w > 1 else ''}, {c} connection{'s' if c > 1 else ''}",
            rates[w, c],
            "recipients/s",
            pinned,
        )
        for w in (1, 2)
        for c in (1, CONNECTIONS)
    ] + [
        Figure(
            MEASURE,
            f"cores busy (gateway + fake Braze + client), {w} worker(s), {c} connection(s)",
            cores[w, c],
            "cores",
        )
        for w in (1, 2)
        for c in (1, CONNECTIONS)
    ]
    return [
        *figures,
        Figure(
            MEASURE,
            f"2 workers: {CONNECTIONS} connections / 1 connection",
            rates[2, CONNECTIONS] / rates[2, 1],
            "x",
        ),
        Figure(
            MEASURE,
            f"{CONNECTIONS} connections: 2 workers / 1 worker",
            rates[2, CONNECTIONS] / rates[1, CONNECTIONS],
            "x",
        ),
        Figure(MEASURE, "1 connection: 2 workers / 1 worker", rates[2, 1] / rates[1, 1], "x"),
    ]
