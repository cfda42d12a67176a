"""Redis cost: what the round trips to a shared Redis (CGW_REDIS_URL) cost per batch of 50, and
what the host's SQLite file (keys without Redis) costs beside the in-process store.

Each batch a gateway sends costs two budget operations (reserve before the Braze call, settle
after it) and, with an idempotency key, three result operations (claim before, the mark that its
call leaves just before the request is written, keep after). In
process they are a dict update; with Redis each is one Lua script, one round trip to a
redis-server on 127.0.0.1 (tests/servers.py starts Debian's). Measured in one run:

  stores     the gateway's own classes called in a loop from this process, N batches: reserve +
             settle on TableBudgets (in-process) and on RedisBudgets; claim + mark_sending +
             keep (a SENT result kept) on LocalResults, on HostResults (a SQLite file in a
             temporary folder, its calls on a thread of their own) and on RedisResults.
             Sequentially (one batch after another: the latency of the round trips) and from 8
             tasks at once (the gateway's default request concurrency: how far pipelining over 8
             connections hides them).
             Rounds alternate in-process and Redis; figures are medians over the rounds: wall time
             per batch, this process's CPU per batch (the client's share, which a gateway pays)
             and redis-server's CPU per batch. Every reservation must be a Ticket and every
             claim CLAIMED, and the last batch's result must come back KEPT.
  contention the host file from 2 processes at once (2 workers of a gateway), each claiming, marking
             and keeping batches at a worker's pace (8 in flight, each call to Braze 4 ms: about
             2,000 batches a second); the same with the in-process store as the control. A host
             file's call runs on the event loop, and sleeps while another writer holds the lock
             (`host_results`): p50, p99.9 and the longest time of a call, over every call.
  end to end one SendStream of 20,000 recipients (400 batches) through one gateway process,
             with and without an idempotency key (a new key each run, so every batch is
             claimed and kept, none replayed), against a fake Braze that answers at once (so
             the CPU, not Braze, sets the pace), with the stores in three places: the
             process's memory (a gateway on port 0: budgets and keys' results in memory, the
             promise a single process can keep alone), the host's files (a gateway on a port:
             its workers' budgets in a mapped file, keys' results and GetResults' rows in a
             SQLite file, the default without Redis) and Redis (CGW_REDIS_URL). The six
             variants run in turn, the order rotating each round; every result must be SENT
             and not replayed. Figures:
             throughput as a ratio to the in-process gateway without a key (the median of each
             round's ratio), Redis against in-process with and without a key (issue 22's bar:
             at most 10% of throughput and of CPU), and the gateway's and redis-server's CPU
             per batch, totals over every round (/proc counts CPU in 10 ms ticks).

Machines here are noisy and have 2 cores, which the gateway, the fake Braze, redis-server and
this client share: read the ratios and the CPU per batch, not the absolute rates.

    .venv/bin/python bench/suite.py --only redis_cost --out -
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server import keeping
from canvas_gateway_server.context import IdempotencyScope
from canvas_gateway_server.idempotency import ResultStore, Verdict
from canvas_gateway_server.model import BatchResult, Code, Outcome
from canvas_gateway_server.rate_budget import BudgetStore, Ticket
from canvas_gateway_server.reply import Delivery, RateLimit, Reply
from canvas_gateway_server.stores import host_results
from canvas_gateway_server.stores import redis as redis_store
from canvas_gateway_server.stores.host_results import HostResults
from canvas_gateway_server.stores.memory import LocalResults, TableBudgets
from canvas_gateway_server.stores.resp import LeanRedis
from harness import (
    AUTH,
    CANVAS,
    CONTEXT,
    Figure,
    cpu_seconds,
    encoded_chunks,
    fake_braze_command,
    free_port,
    gateway_env,
    wait_port,
    wait_ready,
    write_tenants,
)
from replicas import Gateway, start_gateway

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from servers import redis_server, stop_process  # tests/ is on the path now

MEASURE = "redis_cost"
BATCH = 50
CONCURRENCY = 8
TIMEOUT_SECONDS = 5.0
"""Redis timeout of the stores called here: generous, a slow answer on a busy machine is a figure."""
BUDGET = ("bench", "recipients")  # (workspace, pool)
DIGEST = "0" * 32
KEPT = keeping.encode(
    BatchResult(
        0,
        tuple(range(BATCH)),
        Outcome.SENT,
        Code.OK,
        dispatch_id="bench-dispatch",
        message="success",
        http_status=201,
        attempts=1,
    )
)


def reply() -> Reply:
    """A 201 as the fake gives it: a large budget left in the current clock hour."""
    now = time.time()
    return Reply(Delivery.RESPONDED, 201, rate=RateLimit(10**9, 10**9 - 1, int(now - now % 3600) + 3600))


def budget_batch(store: BudgetStore) -> Callable[[int], Awaitable[None]]:
    answer = reply()

    async def one(_: int) -> None:
        ticket = await store.reserve(BUDGET, time.time())
        assert isinstance(ticket, Ticket), ticket
        assert await store.settle(ticket, answer, time.time()) == 0.0

    return one


def result_batch(store: ResultStore, scope: IdempotencyScope) -> Callable[[int], Awaitable[None]]:
    async def one(index: int) -> None:
        token = uuid.uuid4().hex
        claim = await store.claim(scope, index, DIGEST, token)
        assert claim.verdict is Verdict.CLAIMED, claim
        assert await store.mark_sending(scope, index, token)
        await store.keep(scope, index, DIGEST, token, KEPT)

    return one


async def loop(
    batch: Callable[[int], Awaitable[None]], n: int, concurrency: int, redis: int
) -> tuple[float, float, float]:
    """N batches from `concurrency` tasks: (wall us, this process's CPU us, Redis CPU us) per batch."""

    async def worker(first: int) -> None:
        for index in range(first, n, concurrency):
            await batch(index)

    cpu, redis_cpu, began = time.process_time(), cpu_seconds(redis), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu, redis_cpu = time.process_time() - cpu, cpu_seconds(redis) - redis_cpu
    return elapsed / n * 1e6, cpu / n * 1e6, redis_cpu / n * 1e6


async def stores(redis_url: str, redis: int, n: int, rounds: int) -> list[Figure]:
    client = redis_store.connect(redis_url, TIMEOUT_SECONDS)
    folder = tempfile.TemporaryDirectory()
    host_results.create(f"{folder.name}/keys.sqlite3", private_folder=False)
    host = HostResults(f"{folder.name}/keys.sqlite3", ttl=3600.0, lease=60.0)
    figures = []
    try:
        table, remote = TableBudgets(), redis_store.RedisBudgets(client, lease=60.0)
        kinds: dict[str, dict[str, Callable[[], Callable[[int], Awaitable[None]]]]] = {
            "budgets reserve+settle": {
                "in-process": lambda: budget_batch(table),
                "Redis": lambda: budget_batch(remote),
            },
        }
        local = LocalResults(ttl=3600.0, capacity=10**6, lease=60.0)
        results = redis_store.RedisResults(client, ttl=3600.0, lease=60.0)
        scopes: dict[str, IdempotencyScope] = {}

        def fresh(way: str, store: ResultStore) -> Callable[[int], Awaitable[None]]:
            """A new scope for every loop: each claim is of a batch nobody claimed."""
            scopes[way] = IdempotencyScope("bench", uuid.uuid4().hex)
            return result_batch(store, scopes[way])

        kinds["results claim+mark+keep"] = {
            "in-process": lambda: fresh("in-process", local),
            "host file": lambda: fresh("host file", host),
            "Redis": lambda: fresh("Redis", results),
        }
        for kind, ways in kinds.items():
            for concurrency in (1, CONCURRENCY):
                for make in ways.values():  # warm up: connections, scripts loaded
                    await loop(make(), min(n, 50), concurrency, redis)
                taken: dict[str, list[tuple[float, float, float]]] = {way: [] for way in ways}
                order = list(ways)
                for _ in range(rounds):
                    for way in order:
                        taken[way].append(await loop(ways[way](), n, concurrency, redis))
                    order.reverse()
                how = "sequential" if concurrency == 1 else f"{concurrency} concurrent"
                local_wall = statistics.median(t[0] for t in taken["in-process"])
                figures.append(
                    Figure(MEASURE, f"{kind}, in-process, {how}: time per batch", local_wall, "us")
                )
                for way in ways:
                    if way == "in-process":
                        continue
                    wall, cpu, server = (statistics.median(each) for each in zip(*taken[way], strict=True))
                    figures += [
                        Figure(MEASURE, f"{kind}, {way}, {how}: time per batch", wall, "us"),
                        Figure(MEASURE, f"{kind}, {way}, {how}: caller CPU per batch", cpu, "us"),
                    ]
                    if way == "Redis":
                        figures.append(
                            Figure(MEASURE, f"{kind}, Redis, {how}: redis-server CPU per batch", server, "us")
                        )
                    else:
                        ratio = wall / local_wall
                        figures.append(
                            Figure(MEASURE, f"{kind}, {way} / in-process, {how}: time", ratio, "x")
                        )
        # What was kept can be read back: the last batch of the last loop, from each store.
        for name, store in (("in-process", local), ("host file", host), ("Redis", results)):
            found = await store.claim(scopes[name], n - 1, DIGEST, uuid.uuid4().hex)
            assert (found.verdict, found.kept) == (Verdict.KEPT, KEPT), found
    finally:
        await client.aclose()
        await host.stop()
        folder.cleanup()
    return figures


CALL_SECONDS: Final = 0.004
"""How long the Braze call of each batch takes in `contention`: with CONCURRENCY batches in flight,
about 2,000 batches a second per process, a gateway worker's pace at full speed here."""


async def call_times(path: str, n: int) -> list[float]:
    """N batches claimed, marked and kept (a call of CALL_SECONDS between mark and keep) from
    CONCURRENCY tasks, in the host file at `path` (in this process's memory if ""): how long each
    claim, mark and keep took, in seconds. One that runs on the event loop holds it that long; one
    that finds the lock held sleeps meanwhile (`host_results`)."""
    store: ResultStore = HostResults(path, 3600.0, 60.0) if path else LocalResults(3600.0, 10**6, 60.0)
    scope = IdempotencyScope("bench", uuid.uuid4().hex)
    taken: list[float] = []
    clock = time.perf_counter

    async def worker(first: int) -> None:
        for index in range(first, n, CONCURRENCY):
            token = uuid.uuid4().hex
            began = clock()
            claim = await store.claim(scope, index, DIGEST, token)
            claimed = clock()
            marked = await store.mark_sending(scope, index, token)
            taken.extend((claimed - began, clock() - claimed))
            assert claim.verdict is Verdict.CLAIMED, claim
            assert marked
            await asyncio.sleep(CALL_SECONDS)
            began = clock()
            await store.keep(scope, index, DIGEST, token, KEPT)
            taken.append(clock() - began)

    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    if isinstance(store, HostResults):
        await store.stop()
    return taken


def call_times_main(path: str, n: int) -> None:
    """A process of `contention`: prints its calls' times (JSON, seconds)."""
    print(json.dumps(asyncio.run(call_times(path, n))))


async def contention(n: int, workers: int = 2) -> list[Figure]:
    """`workers` processes at once on one host file, then each in its own memory."""
    found: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/keys.sqlite3"
        host_results.create(path, private_folder=False)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        for way, where in (("host file", path), ("in-process", "")):
            code = f"import redis_cost; redis_cost.call_times_main({where!r}, {n})"
            running = [
                await asyncio.create_subprocess_exec(
                    sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.PIPE
                )
                for _ in range(workers)
            ]
            outputs = await asyncio.gather(*(process.communicate() for process in running))
            assert all(process.returncode == 0 for process in running), [p.returncode for p in running]
            found[way] = sorted(taken for out, _ in outputs for taken in json.loads(out))
    label = f"{workers} processes at once, a worker's pace: claim, mark or keep, time"
    figures = []
    for way, taken in found.items():
        figures += [
            Figure(MEASURE, f"{way}, {label} p50", taken[len(taken) // 2] * 1e6, "us"),
            Figure(MEASURE, f"{way}, {label} p99.9", taken[int(len(taken) * 0.999)] * 1e6, "us"),
            Figure(MEASURE, f"{way}, {label} longest", taken[-1] * 1e6, "us"),
        ]
    return figures


# --- end to end -----------------------------------------------------------------------------


def header(key: str) -> bytes:
    trigger = pb.CanvasTrigger(canvas_id=CANVAS)
    trigger.context.update(CONTEXT)
    options = pb.SendOptions(idempotency_key=key)
    message = pb.SendStreamRequest(header=pb.StreamHeader(trigger=trigger, options=options))
    data: bytes = message.SerializeToString()
    return data


async def send(channel: grpc.aio.Channel, n: int, parts: Sequence[bytes], key: str) -> tuple[float, int]:
    """One SendStream of N recipients (with `key`, if any): (seconds, batches). Every result
    must be SENT and not replayed, every recipient get one result, the summary count N."""

    async def requests() -> AsyncIterator[bytes]:
        yield header(key)
        for part in parts:
            yield part

    method = channel.stream_stream(
        "/canvas_gateway.v1.CanvasGatewayService/SendStream",
        request_serializer=None,
        response_deserializer=pb.SendStreamResponse.FromString,
    )
    seen = batches = 0
    began = time.perf_counter()
    async for response in method(requests(), metadata=AUTH):
        if response.HasField("result"):
            result = response.result
            assert (result.outcome, result.replayed) == (pb.OUTCOME_SENT, False), result
            seen += len(result.positions)
            batches += 1
        elif response.HasField("summary"):  # a message with no part is skipped
            assert response.summary.recipients == n, response.summary
    elapsed = time.perf_counter() - began
    assert seen == n, (seen, n)
    return elapsed, batches


VARIANTS = {  # (gateway, with a key)
    "in-process, no key": ("memory", False),
    "in-process, key": ("memory", True),  # the key's results in its memory (LocalResults)
    "host file, no key": ("file", False),  # a gateway on a port: its workers' budgets in a file
    "host file, key": ("file", True),  # the default without Redis (HostResults)
    "Redis, no key": ("redis", False),
    "Redis, key": ("redis", True),
}
BASELINE = "in-process, no key"
LISTENING = re.compile(r"listening on \S+ \(port (\d+), \w+\); admin on port (\d+)")


async def start_in_memory(started: AsyncExitStack, tenants: Path, folder: Path) -> Gateway:
    """A gateway on port 0: one process whose keys' results stay in its memory (a restart
    would not find that port again, so there is no file to share). Its ports come from its log."""
    log = folder / "memory-gateway.log"
    with log.open("wb") as out:
        env = gateway_env(tenants, 0, {"CGW_IDEMPOTENCY_FILE": "", "CGW_LOG_LEVEL": "INFO"})
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "canvas_gateway_server"), env=env, stderr=out
        )
    started.push_async_callback(stop_process, process)
    for _ in range(600):  # 30 s
        if found := LISTENING.search(log.read_text()):
            return Gateway(process, f"127.0.0.1:{found[1]}", f"127.0.0.1:{found[2]}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the in-memory gateway never said where it listens:\n{log.read_text()[-2000:]}")


async def end_to_end(redis_url: str, redis: int, n: int, rounds: int) -> list[Figure]:
    parts = encoded_chunks(n, 500)
    fake_port = free_port()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_used = {name: {"gateway": 0.0, "redis": 0.0, "batches": 0.0, "scripts": 0.0} for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), f"http://127.0.0.1:{fake_port}")
        async with AsyncExitStack() as started:
            fake = await asyncio.create_subprocess_exec(
                *fake_braze_command(fake_port), stdout=asyncio.subprocess.DEVNULL
            )
            started.push_async_callback(stop_process, fake)
            gateways = {
                "memory": await start_in_memory(started, tenants, Path(tmp)),
                "file": await start_gateway(
                    started, tenants, {"CGW_IDEMPOTENCY_FILE": f"{tmp}/keys.sqlite3"}
                ),
                "redis": await start_gateway(started, tenants, {"CGW_REDIS_URL": redis_url}),
            }
            await wait_port(fake_port)
            await asyncio.gather(*(wait_ready(gateway.admin) for gateway in gateways.values()))
            channels = {uses: grpc.aio.insecure_channel(g.target) for uses, g in gateways.items()}
            started.push_async_callback(asyncio.gather, *(c.close() for c in channels.values()))
            stats = redis_store.connect(redis_url, TIMEOUT_SECONDS)
            started.push_async_callback(stats.aclose)
            warm = encoded_chunks(2_000, 500)
            for uses, keyed in VARIANTS.values():
                await send(channels[uses], 2_000, warm, f"warm-{uuid.uuid4()}" if keyed else "")
            order = list(VARIANTS)
            for turn in range(rounds):
                shift = turn % len(order)
                taken = {}
                for name in order[shift:] + order[:shift]:
                    uses, keyed = VARIANTS[name]
                    pid = gateways[uses].process.pid
                    key = f"bench-{uuid.uuid4()}" if keyed else ""
                    cpu, server = cpu_seconds(pid), cpu_seconds(redis)
                    ran = await scripts_run(stats) if uses == "redis" else 0
                    elapsed, batches = await send(channels[uses], n, parts, key)
                    cpu, server = cpu_seconds(pid) - cpu, cpu_seconds(redis) - server
                    ran = await scripts_run(stats) - ran if uses == "redis" else 0
                    assert batches == -(-n // BATCH), batches
                    taken[name] = n / elapsed
                    used = cpu_used[name]
                    used["gateway"], used["redis"] = used["gateway"] + cpu, used["redis"] + server
                    used["batches"] += batches
                    used["scripts"] += ran
                for name, rate in taken.items():
                    rates[name].append(rate)
                    ratios[name].append(rate / taken[BASELINE])

    # CPU is counted in clock ticks (10 ms): per batch, it is the total over every round.
    per_batch = {
        name: {what: used[what] / used["batches"] * 1e6 for what in ("gateway", "redis")}
        for name, used in cpu_used.items()
    }
    stream = f"{n:,}-recipient SendStream"
    figures = [Figure(MEASURE, f"{stream}, {BASELINE}", statistics.median(rates[BASELINE]), "recipients/s")]
    for name in VARIANTS:
        if name != BASELINE:
            ratio = statistics.median(ratios[name])
            figures.append(Figure(MEASURE, f"{stream}: throughput ({name}) / ({BASELINE})", ratio, "x"))
    for name in VARIANTS:
        cpu = per_batch[name]["gateway"]
        figures.append(Figure(MEASURE, f"{stream}: gateway CPU per batch, {name}", cpu, "us"))
    pairs = {  # Redis against the in-process stores that give the same promise in one process
        "no key": ("Redis, no key", "in-process, no key"),
        "key": ("Redis, key", "in-process, key"),
    }
    for what, (redis_name, memory_name) in pairs.items():
        ratio = statistics.median(r / m for r, m in zip(ratios[redis_name], ratios[memory_name], strict=True))
        figures.append(
            Figure(MEASURE, f"{stream}: throughput Redis / in-process, {what}", ratio, "x", ">= 0.9")
        )
        cpu = per_batch[redis_name]["gateway"] / per_batch[memory_name]["gateway"]
        figures.append(
            Figure(MEASURE, f"{stream}: gateway CPU per batch Redis / in-process, {what}", cpu, "x", "<= 1.1")
        )
    added = {
        "Redis budgets (no key)": per_batch["Redis, no key"]["gateway"] - per_batch[BASELINE]["gateway"],
        "a key in Redis": per_batch["Redis, key"]["gateway"] - per_batch["Redis, no key"]["gateway"],
        "a key in memory": per_batch["in-process, key"]["gateway"] - per_batch[BASELINE]["gateway"],
        "a key in the host's file": per_batch["host file, key"]["gateway"]
        - per_batch["host file, no key"]["gateway"],
    }
    for what, cpu in added.items():
        figures.append(Figure(MEASURE, f"{stream}: gateway CPU per batch added by {what}", cpu, "us"))
    for name, (uses, _) in VARIANTS.items():
        if uses == "redis":
            cpu = per_batch[name]["redis"]
            figures.append(Figure(MEASURE, f"{stream}: redis-server CPU per batch, {name}", cpu, "us"))
            scripts = cpu_used[name]["scripts"] / cpu_used[name]["batches"]
            figures.append(Figure(MEASURE, f"{stream}: Redis scripts run per batch, {name}", scripts, ""))
    return figures


async def scripts_run(client: LeanRedis) -> int:
    """How many scripts Redis has run (EVALSHA, INFO commandstats): a count, not a time, so the
    same in every run, however busy the machine."""
    stats = (await client.call("INFO", "commandstats")).decode()
    found = re.search(r"cmdstat_evalsha:calls=(\d+)", stats)
    return int(found.group(1)) if found else 0


async def measure(smoke: bool) -> list[Figure]:
    n, rounds, recipients, streams = (40, 1, 1_000, 1) if smoke else (2_000, 3, 20_000, 9)
    async with redis_server() as redis:
        assert redis.process is not None
        figures = await stores(redis.url, redis.process.pid, n, rounds)
        figures += await contention(n * 5)
        figures += await end_to_end(redis.url, redis.process.pid, recipients, streams)
    return figures
