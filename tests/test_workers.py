"""Several workers behind one port: the real entrypoint as a process tree, a real fake Braze.

Connections spread over the workers (the kernel's SO_REUSEPORT), the admin port merges their
metrics with a `worker` label, a spent Braze budget learned by one worker stops every worker
before it calls, and SIGTERM drains them all to exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.idempotency import BUSY_RETRY_SECONDS
from canvas_gateway_server.limits import LocalLimiter, Reserved
from canvas_gateway_server.model import Batch
from canvas_gateway_server.rate_budget import Hold, Ticket
from canvas_gateway_server.reply import Delivery, RateLimit, Reply
from canvas_gateway_server.settings import Settings
from canvas_gateway_server.stores.host_budgets import HostBudgets
from canvas_gateway_server.stores.memory import TableBudgets
from canvas_gateway_server.tenants import Tenant
from canvas_gateway_server.worker_admin import merge_expositions
from canvas_gateway_server.workers import worker_count
from fake_braze import FakeBraze, FakeBrazeConfig
from prometheus_client.parser import text_string_to_metric_families
from servers import start_logged_replica, start_replica, stop_process
from support import FAKE_URLS, KEYS, TOKENS, Cutter, check_sent_once, standing_clock, tenants_toml, until

AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)
ABORTED = grpc.StatusCode.ABORTED.value[0]
CONNECTIONS = 16
"""Each on its own connection: all 16 on one of 2 workers has a chance of 2 in 65,536."""


def request(recipients: int, first: int = 0) -> pb.SendRequest:
    users = [pb.Recipient(external_user_id=f"u{first + i}") for i in range(recipients)]
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=users))


@pytest.fixture
async def workers(
    fake: FakeBraze, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    async with aiohttp.ClientSession() as session:
        replica = await start_replica(
            tenants,
            session,
            CGW_WORKERS="2",
            CGW_SHUTDOWN_DELAY_SECONDS="0",
            CGW_MAX_RETRY_WAIT_SECONDS="0",  # a paused budget answers at once, never waits
        )
    try:
        yield replica.process, replica.address, replica.admin
    finally:
        if replica.process.returncode is None:
            replica.process.kill()
            await replica.process.wait()


async def send_on_own_connections(address: str, requests: list[pb.SendRequest]) -> list[pb.SendResponse]:
    """Each request on a channel of its own; a local subchannel pool keeps gRPC from sharing
    one connection among channels to the same address (which is what it does by default)."""

    async def one(message: pb.SendRequest) -> pb.SendResponse:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = pb_grpc.CanvasGatewayServiceStub(channel)
            reply: pb.SendResponse = await stub.Send(message, metadata=AUTH, timeout=10)
            return reply

    return list(await asyncio.gather(*(one(message) for message in requests)))


async def rpcs_by_worker(admin: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{admin}/metrics") as reply:
        text = await reply.text()
    assert "_created" not in text  # each worker leaves them out, so the merge has none
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "grpc_server_handled":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["grpc_method"] == "Send":
                    worker = sample.labels["worker"]
                    counts[worker] = counts.get(worker, 0) + sample.value
    return counts


async def test_connections_spread_over_workers_and_metrics_say_which(
    workers: tuple[asyncio.subprocess.Process, str, str], fake: FakeBraze
) -> None:
    _, address, admin = workers
    replies = await send_on_own_connections(address, [request(3, 10 * i) for i in range(CONNECTIONS)])
    assert [reply.summary.recipients_sent for reply in replies] == [3] * CONNECTIONS
    assert len(fake.sent()) == CONNECTIONS
    by_worker = await rpcs_by_worker(admin)
    assert set(by_worker) == {"0", "1"}, by_worker
    assert sum(by_worker.values()) == CONNECTIONS
    assert min(by_worker.values()) >= 1


@pytest.fixture
def fake_config(request: pytest.FixtureRequest) -> FakeBrazeConfig:
    # The fake's window stands still (the workers' clock is real; its reset is an hour or more ahead).
    limit = getattr(request, "param", 250_000)
    return FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=limit, clock=standing_clock())


async def test_json_logs_of_several_workers_say_which_and_the_supervisor_its_admin_address(
    fake: FakeBraze, tmp_path: Path
) -> None:
    tenants, log_file = tmp_path / "tenants.toml", tmp_path / "gateway.log"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    async with aiohttp.ClientSession() as session:
        settings = {"CGW_WORKERS": "2", "CGW_LOG_FORMAT": "json", "CGW_SHUTDOWN_DELAY_SECONDS": "0"}
        replica = await start_logged_replica(tenants, session, log_file, settings)
    try:
        await send_on_own_connections(replica.address, [request(3, 10 * i) for i in range(CONNECTIONS)])
        async with grpc.aio.insecure_channel(replica.address) as channel:
            wrong = (("authorization", f"Bearer {TOKENS['acme']}-wrong"),)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.CanvasGatewayServiceStub(channel).Send(request(1), metadata=wrong, timeout=10)
        replica.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(replica.process.wait(), 30) == 0
    finally:
        if replica.process.returncode is None:
            replica.process.kill()
            await replica.process.wait()
    text = log_file.read_text()
    assert KEYS["acme"] not in text and TOKENS["acme"] not in text
    records = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    (supervising,) = [r for r in records if r["message"].startswith("canvas-gateway supervising")]
    assert supervising["message"].endswith(f"; admin on {replica.admin}")
    assert (supervising["admin_address"], supervising["workers"]) == (replica.admin, 2)
    assert {r["logger"] for r in records if "worker" not in r} == {"canvas_gateway_server.workers"}
    assert records[-1]["exit_codes"] == [0, 0]
    started = [r for r in records if r["message"].startswith("canvas-gateway worker ")]
    assert sorted(r["worker"] for r in started) == [0, 1]
    assert all(r["message"].startswith(f"canvas-gateway worker {r['worker']} of 2") for r in started)
    access = [r for r in records if r["logger"] == "canvas_gateway_server.access"]
    sent = [r for r in access if r["grpc_code"] == "OK"]
    assert len(sent) == CONNECTIONS and {r["worker"] for r in sent} == {0, 1}
    assert all(r["outcomes"]["sent"] == 3 and r["recipients"] == 3 and r["batches"] == 1 for r in sent)
    (refused,) = [r for r in access if r["grpc_code"] == "UNAUTHENTICATED"]
    assert refused["grpc_message"] == caught.value.details() == "unknown bearer token"
    assert refused["worker"] in (0, 1)


@pytest.mark.parametrize("fake_config", [2], indirect=True)
async def test_a_budget_spent_on_one_worker_stops_every_worker(
    workers: tuple[asyncio.subprocess.Process, str, str], fake: FakeBraze
) -> None:
    _, address, _ = workers
    # Two calls spend the budget of 2: the second reply says x-ratelimit-remaining 0.
    (first,) = await send_on_own_connections(address, [request(100)])
    assert [result.braze.http_status for result in first.results] == [201, 201]
    # Whichever worker each connection reaches, none calls Braze again until the reset.
    replies = await send_on_own_connections(address, [request(3, 1000 + 10 * i) for i in range(CONNECTIONS)])
    results = [result for reply in replies for result in reply.results]
    assert {(result.outcome, result.code) for result in results} == {
        (pb.OUTCOME_REJECTED, 8)  # google.rpc.Code RESOURCE_EXHAUSTED: nothing was sent
    }
    assert len(fake.calls) == 2, [call.status for call in fake.calls]  # not one 429


async def test_sigterm_drains_every_worker_and_exits_0(
    workers: tuple[asyncio.subprocess.Process, str, str],
) -> None:
    proc, address, admin = workers
    await send_on_own_connections(address, [request(1)])
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as session, session.get(f"http://{admin}/healthz"):
            pass


async def test_workers_share_keys_on_the_host_and_keep_them_across_a_restart(
    fake: FakeBraze, tmp_path: Path
) -> None:
    """Without Redis: a repeat that reaches another worker, and one after the gateway restarts
    on its port, is replayed from the supervisor's file in the temporary directory (its
    default); nothing is sent twice."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    temporary = tempfile.mkdtemp(prefix="cgw")  # short: the workers' admin sockets live there too
    keyed = request(120)
    keyed.options.idempotency_key = "order-7"
    settings = {"CGW_WORKERS": "2", "CGW_SHUTDOWN_DELAY_SECONDS": "0", "CGW_IDEMPOTENCY_FILE": ""}
    try:
        async with aiohttp.ClientSession() as session:
            first = await start_replica(tenants, session, TMPDIR=temporary, **settings)
        try:
            (sent,) = await send_on_own_connections(first.address, [keyed])
            repeats = await send_on_own_connections(first.address, [keyed] * CONNECTIONS)
            assert [r.outcome for r in sent.results] == [pb.OUTCOME_SENT] * 3
            assert len(fake.calls) == 3
            assert {(r.outcome, r.replayed) for reply in repeats for r in reply.results} == {
                (pb.OUTCOME_SENT, True)
            }
            assert len([n for n in (await rpcs_by_worker(first.admin)).values() if n]) == 2  # both answered
        finally:
            first.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(first.process.wait(), 30) == 0
        port = first.address.rpartition(":")[2]
        folder = Path(temporary, f"canvas-gateway-{port}")
        assert (folder.stat().st_mode & 0o777, {p.name for p in folder.iterdir()} >= {"keys.sqlite3"}) == (
            0o700,
            True,
        )

        async with aiohttp.ClientSession() as session:  # the gateway again, on its port
            again = await start_replica(
                tenants, session, TMPDIR=temporary, CGW_GRPC_ADDRESS=first.address, **settings
            )
        try:
            replies = await send_on_own_connections(first.address, [keyed] * 4)  # its own port
            assert {(r.outcome, r.replayed) for reply in replies for r in reply.results} == {
                (pb.OUTCOME_SENT, True)
            }
            assert len(fake.calls) == 3
        finally:
            await stop_process(again.process)
    finally:
        shutil.rmtree(temporary)


def keyed_stream(count: int, key: str) -> list[pb.SendStreamRequest]:
    header = pb.StreamHeader(
        trigger=pb.CanvasTrigger(canvas_id="c"), options=pb.SendOptions(idempotency_key=key)
    )
    chunks = [request(100, first).trigger.recipients for first in range(0, count, 100)]
    return [
        pb.SendStreamRequest(header=header),
        *(pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=c)) for c in chunks),
    ]


async def stream_on_own_connection(target: str, messages: list[pb.SendStreamRequest]) -> list[pb.BatchResult]:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own: either worker
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.CanvasGatewayServiceStub(channel)
        call = stub.SendStream(iter(messages), metadata=AUTH, timeout=30)
        return [m.result async for m in call if m.HasField("result")]


@pytest.mark.parametrize("cut", ["cancelled", "connection_reset"])
async def test_a_keyed_stream_cut_off_is_resent_at_once_on_either_worker_and_nobody_gets_it_twice(
    workers: tuple[asyncio.subprocess.Process, str, str], fake: FakeBraze, cut: str
) -> None:
    """A keyed stream cut off mid-way (its caller cancels, or its connection is reset) and sent
    again at once, on new connections (either worker): a batch may come back BUSY only while the
    cut-off worker has not yet taken in the cut, and is free by the time its RetryInfo says
    (BUSY_RETRY_SECONDS): its claim released (never sent: sent now), or its UNKNOWN kept (in
    flight at the cut: never sent again)."""
    _, address, _ = workers
    fake.faults.set_latency(0.05)  # calls in flight when the stream is cut
    messages = keyed_stream(2000, f"cut-{cut}")
    async with Cutter(int(address.rpartition(":")[2])) as cutter:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cutter.port}", options=options) as channel:
            call = pb_grpc.CanvasGatewayServiceStub(channel).SendStream(iter(messages), metadata=AUTH)
            seen = 0
            async for message in call:
                seen += message.HasField("result")
                if seen == 5:
                    if cut == "cancelled":
                        call.cancel()
                    else:
                        cutter.cut()
                    break
    # At once, on four connections: a batch in flight at the cut is BUSY until its worker takes
    # the cut in (or while another of these four sends it).
    first = await asyncio.gather(*(stream_on_own_connection(address, messages) for _ in range(4)))
    unsent = [r for results in first for r in results if r.outcome == pb.OUTCOME_NOT_ATTEMPTED]
    assert {(r.code, r.retryable) for r in unsent} <= {(ABORTED, True)}  # busy: nothing else
    busy = sorted({r.batch_index for r in unsent})
    await asyncio.sleep(BUSY_RETRY_SECONDS)  # as their RetryInfo says
    again = await stream_on_own_connection(address, messages)
    assert sorted(p for r in again for p in r.positions) == list(range(2000))
    assert [r.batch_index for r in again if r.outcome == pb.OUTCOME_NOT_ATTEMPTED] == [], busy
    check_sent_once(again, fake)


def test_worker_count_is_the_setting_or_the_cores_and_one_for_the_demo() -> None:
    assert worker_count(Settings.from_env({}, tenants_file="t", workers=3)) == 3
    assert worker_count(Settings.from_env({}, tenants_file="t")) == min(
        len(os.sched_getaffinity(0)), worker_count(Settings.from_env({}, tenants_file="t", workers=0))
    )
    assert worker_count(Settings.from_env({}, demo=True, workers=4)) == 1


async def test_budgets_are_shared_through_their_file_and_keys_do_not_mix(tmp_path: Path) -> None:
    path = str(tmp_path / "budgets")
    HostBudgets.create(path)
    now = 2_000_000_000.0
    stores = [HostBudgets(path), HostBudgets(path)]
    one, other = (
        LocalLimiter(8, clock=lambda: now, budgets=TableBudgets(store), workers=2) for store in stores
    )
    acme, globex = Tenant("acme", "http://127.0.0.1:1", "k"), Tenant("globex", "http://127.0.0.1:1", "k2")
    initech = Tenant("initech", "http://127.0.0.1:1", "k")  # acme's workspace: the same URL and key
    plain, broadcast = Batch(0, (), b"{}"), Batch(0, (), b"{}", broadcast=True)
    reset = int(now) + 60
    first = await one.reserve(acme, plain)
    assert isinstance(first, Reserved)
    await one.settle(first, Reply(Delivery.RESPONDED, 201, rate=RateLimit(remaining=2, reset=reset)))
    assert isinstance(await one.reserve(acme, plain), Reserved)
    assert isinstance(await other.reserve(acme, plain), Reserved)  # 1 under way in one, 1 in other
    assert isinstance(await one.reserve(acme, plain), Hold)  # none left: whichever worker asks
    assert isinstance(await other.reserve(initech, plain), Hold)  # nor for its workspace's other tenant
    assert isinstance(await other.reserve(globex, plain), Reserved)  # another workspace's budget
    assert isinstance(await other.reserve(acme, broadcast), Reserved)  # and acme's broadcast budget
    spent = Reply(Delivery.RESPONDED, 429, rate=RateLimit(remaining=0, reset=reset))
    assert await other.settle(Reserved((Ticket((acme.workspace_name, "recipients")),)), spent) == reset
    assert await one.reserve(acme, plain) == Hold(reset, spent=True)  # learned by one, known to all
    for store in stores:
        store.close()


def test_merged_exposition_labels_every_sample_with_its_worker() -> None:
    worker = (
        "# HELP calls_total Calls.\n# TYPE calls_total counter\n"
        'calls_total{tenant="a"} 2.0\n'
        "# HELP lag_seconds Lag.\n# TYPE lag_seconds histogram\n"
        'lag_seconds_bucket{le="0.1"} 1.0\nlag_seconds_bucket{le="+Inf"} 1.0\n'
        "lag_seconds_count 1.0\nlag_seconds_sum 0.05\n"
    )
    merged = merge_expositions([worker, worker.replace("2.0", "5.0"), ""])
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    calls = {(s.labels["worker"], s.value) for s in families["calls"].samples}
    assert calls == {("0", 2.0), ("1", 5.0)}
    assert families["lag_seconds"].type == "histogram"
    assert {s.labels["worker"] for s in families["lag_seconds"].samples} == {"0", "1"}


async def test_each_worker_runs_its_share_of_a_tenants_concurrency() -> None:
    limiter = LocalLimiter(default_concurrency=3, budgets=TableBudgets(), workers=2)
    tenant = Tenant("acme", "http://127.0.0.1:1", "key", max_concurrent_batches=5)

    async def hold(slot: AbstractAsyncContextManager[None], held: asyncio.Event) -> None:
        async with slot:
            held.set()
            await asyncio.sleep(3600)

    for who, expected in (
        (tenant, [True, True, False]),
        (Tenant("b", "http://127.0.0.1:1", "k"), [True, False, False]),
    ):
        events = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(hold(limiter.slot(who), event)) for event in events]
        await until(lambda: sum(e.is_set() for e in events) >= expected.count(True))  # noqa: B023 (awaited here)
        try:
            assert [event.is_set() for event in events] == expected  # 5 // 2 = 2; 3 // 2 = 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


async def test_workers_do_not_outlive_a_killed_supervisor(
    workers: tuple[asyncio.subprocess.Process, str, str],
) -> None:
    proc, _, _ = workers
    pids = children(proc.pid)
    assert len(pids) == 2
    proc.kill()  # SIGKILL: the supervisor cannot stop its workers itself
    await proc.wait()
    for _ in range(200):
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        if not alive:
            break
        await asyncio.sleep(0.05)
    assert alive == [], "workers outlived their supervisor"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
