"""The tests' shared helpers (as grpclib ships `testing.py`): the harness's values and constants,
the tenants file, the clocks a test hands the code, a bounded poll for a state, and what a test
checks of the fake Braze.

Test modules import from here (and from servers.py, wire.py, h2wire.py, prometheus_server.py), never
from one another or from conftest.py, which holds only the fixtures. `FAKE_URLS` is filled by
conftest's `fake` fixture: the URL of each running fake Braze by `id()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.settings import Settings
from canvas_gateway_server.tenants import token_digest
from fake_braze import FakeBraze
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

# docs/braze: the project's own record of Braze's contract (researched in shared/braze, then
# kept true to the code here) and Braze's documented bodies and responses.
BRAZE_DOCS = Path(__file__).resolve().parents[1] / "docs" / "braze"
EXAMPLES = BRAZE_DOCS / "examples"

REQUEST_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.json") if not p.name.startswith("response_"))
LAST_USED_APP_TIMES = [
    ("2019-07-22T13:17:55+0000", True),
    ("2019-07-22T13:17:55Z", True),
    ("2019-07-22T13:17:55.123+02:00", True),
    ("2019-07-22", False),
    ("20190722", False),
    ("2011-W01-2", False),
    ("2019-07-22T13:17:55", False),  # no time zone
    ("2019-07-22 13:17:55+0000", False),
    ("2019-13-45T13:17:55Z", False),
    ("yesterday", False),
]
"""`last_used_app` values: Braze documents an ISO 8601 date-time with its offset. The gateway
and the fake Braze are checked against the same table."""

LOCAL: dict[str, Any] = {"admin_address": "127.0.0.1:0", "shutdown_delay_seconds": 0}
"""Settings every test gateway uses: an admin port of its own, no not-ready delay at shutdown."""

TOKENS = {"acme": "token-acme-4f1c", "globex": "token-globex-9b2e", "initech": "token-initech-77d0"}
FAKE_URLS: dict[int, str] = {}
KEYS = {"acme": "braze-key-acme-1111", "globex": "braze-key-globex-2222", "initech": "braze-key-initech-3333"}


@dataclass
class Harness:
    gateway: Gateway
    fake: FakeBraze
    channel: grpc.aio.Channel
    stub: pb_grpc.CanvasGatewayServiceAsyncStub
    target: str

    @staticmethod
    def auth(tenant: str = "acme") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def free_port() -> int:
    """A free TCP port on 127.0.0.1: for a process told its port, or a server that must come back
    on the same one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_env(tenants: Path, address: str, admin: str, **settings: str) -> dict[str, str]:
    """The environment of a gateway process serving `address` (gRPC) and `admin`: this one's less
    its CGW_ variables and the proxy variables of the machine (HTTPS_PROXY, ...: the fake is on
    loopback), with the tenants file, acme's Braze key, one worker, no not-ready delay, and
    a keys file of its own beside the tenants file (not the host's default in the temporary
    folder, which a later run on the same port would find); `settings`: more CGW_ variables."""
    return {
        **{
            key: value
            for key, value in os.environ.items()
            if not key.startswith("CGW_") and not key.lower().endswith("_proxy")
        },
        "CGW_WORKERS": "1",
        "CGW_IDEMPOTENCY_FILE": str(tenants.parent / f"keys-{address.rpartition(':')[2]}.sqlite3"),
        "CGW_TENANTS_FILE": str(tenants),
        "CGW_GRPC_ADDRESS": address,
        "CGW_ADMIN_ADDRESS": admin,
        "CGW_SHUTDOWN_DELAY_SECONDS": "0",
        "ACME_BRAZE_KEY": KEYS["acme"],
        **settings,
    }


async def start_gateway(settings: Settings) -> Gateway:
    """A gateway of `settings`, with acme's Braze key in its environment as the harness has."""
    return await Gateway.start(settings, environ={"ACME_BRAZE_KEY": KEYS["acme"]})


async def gateway_of(fake: FakeBraze, folder: Path, **settings: Any) -> Gateway:
    """Another gateway in this process against `fake`, with the harness's tenants (a file in
    `folder`) and `settings`: replicas of one Redis, or a gateway restarted on one host file."""
    tenants_file = folder / "tenants.toml"
    tenants_file.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    return await start_gateway(
        Settings.from_env(
            {}, grpc_address="127.0.0.1:0", tenants_file=str(tenants_file), **{**LOCAL, **settings}
        )
    )


@contextlib.asynccontextmanager
async def replicas_on_redis(
    fake: FakeBraze, folder: Path, count: int
) -> AsyncIterator[list[pb_grpc.CanvasGatewayServiceAsyncStub]]:
    """`count` gateways in this process sharing one Redis (`gateway_of`), and a stub on each."""
    from servers import redis_server  # a helper module of its own: imported where it is used

    async with redis_server() as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
        gateways = [await gateway_of(fake, folder, redis_url=url) for _ in range(count)]
        try:
            async with contextlib.AsyncExitStack() as stack:
                channels = [
                    await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{g.port}"))
                    for g in gateways
                ]
                yield [pb_grpc.CanvasGatewayServiceStub(channel) for channel in channels]
        finally:
            for gateway in gateways:
                await gateway.stop(grace=0)


def send_request(count: int, key: str = "") -> pb.SendRequest:
    """A Send of `count` recipients u0, u1, ... under the idempotency key `key` (none if empty)."""
    users = [pb.Recipient(external_user_id=f"u{i}") for i in range(count)]
    trigger = pb.CanvasTrigger(canvas_id="c", recipients=users)
    return pb.SendRequest(trigger=trigger, options=pb.SendOptions(idempotency_key=key))


def with_request_id(tenant: str, request_id: str) -> tuple[tuple[str, str], ...]:
    """The tenant's auth metadata and an `x-request-id`."""
    return (*Harness.auth(tenant), ("x-request-id", request_id))


def tenants_toml(url: str) -> str:
    return (
        "[tenants.acme]\n"
        f'token_sha256 = ["{token_digest(TOKENS["acme"])}"]\n'
        f'braze_rest_url = "{url}"\n'
        'braze_api_key_env = "ACME_BRAZE_KEY"\n'
        "\n[tenants.globex]\n"
        f'token_sha256 = ["{token_digest(TOKENS["globex"])}"]\n'
        f'braze_rest_url = "{url}/"\n'
        f'braze_api_key = "{KEYS["globex"]}"\n'
        "allow_broadcast = true\n"
        "\n[tenants.initech]\n"
        f'token_sha256 = ["{token_digest(TOKENS["initech"])}"]\n'
        f'braze_rest_url = "{url}"\n'
        f'braze_api_key = "{KEYS["initech"]}"\n'
        'context_name = "canvas_entry_properties"\n'
    )


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / name).read_text())
    return data


def trigger_from_json(body: dict[str, Any]) -> pb.CanvasTrigger:
    return json_format.ParseDict(body, pb.CanvasTrigger())


class Clock:
    """A clock that moves only when a test moves it: call it for the time, set or add to `now`."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class WallClock:
    """The wall clock (epoch seconds) that a test can move forward with `skip_to`: a fake Braze
    and a gateway that share one see time jump as if they had waited for it, and nobody waits."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def skip_to(self, period: float) -> None:
        """Jump to the start of the next `period` (a fake's budget window, a clock hour)."""
        self.offset += period - self() % period


def standing_clock() -> Callable[[], float]:
    """A clock that stands one second past the next clock hour, for a fake Braze and a gateway
    together: no budget window turns during a test, whatever the wall clock's hour, minute or
    second, and a window's reset (the hour after) is within what the gateway takes for a real one."""
    moment = (time.time() // 3600 + 1) * 3600 + 1
    return lambda: moment


async def learn_budget(harness: Harness, tenant: str = "acme") -> None:
    """One call for `tenant`, so that the gateway knows its Braze budget: until Braze has answered
    once, a budget lets one call at a time ask (`rate_budget.RateBudget`)."""
    trigger = pb.CanvasTrigger(canvas_id="c", recipients=[pb.Recipient(external_user_id="budget-probe")])
    await harness.stub.Send(pb.SendRequest(trigger=trigger), metadata=harness.auth(tenant))


def violations_of(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations in an error's rich status."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            found: list[tuple[str, str]] = []
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    found.extend((v.field, v.description) for v in bad.field_violations)
            return found
    return []


# The typeshed stubs of grpcio-health-checking and grpcio-reflection give their client stubs no
# methods, so the standard services are called by name here, with their message types.
async def health_check(harness: Harness, service: str) -> health_pb2.HealthCheckResponse:
    check = harness.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return await check(health_pb2.HealthCheckRequest(service=service))


def health_watch(harness: Harness) -> AsyncIterator[health_pb2.HealthCheckResponse]:
    watch = harness.channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return aiter(watch(health_pb2.HealthCheckRequest(service="")))


async def until(condition: Callable[[], bool], seconds: float = 20) -> None:
    """Wait for a state, polling; the test fails with TimeoutError if it has not come in `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.005)


def batches_in_flight(gateway: Gateway) -> float:
    """The gateway's batches being sent now (claimed, waiting for budget or calling Braze)."""
    return sum(
        sample.value
        for family in gateway.registry.collect()
        if family.name == "canvas_gateway_batches_in_flight"
        for sample in family.samples
    )


def idle(gateway: Gateway, fake: FakeBraze) -> bool:
    """Nothing under way: no RPC in the gateway's servicer, no batch in flight, nothing in its
    ledger's backlog (claims settled), and no call at the fake (which records a call as it answers)."""
    return (
        not gateway.servicer.in_flight.busy
        and not batches_in_flight(gateway)
        and not gateway.dispatcher.ledger.backlog
        and not fake.in_progress
    )


async def until_sending_stops(fake: FakeBraze, within: float = 30.0) -> int:
    """Wait until the fake has had no new call for a second (a stalled or stopped sender); the
    calls it had then."""
    seen = -1
    async with asyncio.timeout(within):
        while (count := len(fake.calls)) != seen:
            seen = count
            await asyncio.sleep(1.0)
    return seen


def sent_to(fake: FakeBraze) -> Counter[str]:
    """How many calls the fake accepted (201, no notice) carried each external_user_id."""
    return Counter(r["external_user_id"] for call in fake.sent() for r in call.body["recipients"])


def check_sent_once(results: Iterable[pb.BatchResult], fake: FakeBraze) -> None:
    """Nobody got the Canvas twice, and each result says what happened to its users u<position>:
    SENT ones were sent once; any other is UNKNOWN and replayed (in flight when its call was cut
    off, and never sent again)."""
    got = sent_to(fake)
    assert max(got.values()) == 1
    for result in results:
        users = {f"u{p}" for p in result.positions}
        if result.outcome == pb.OUTCOME_SENT:
            assert all(got[user] == 1 for user in users)
        else:
            assert (result.outcome, result.replayed) == (pb.OUTCOME_UNKNOWN, True)


SECRET_PIECES = ("Qz9", "Xv7k", "Jw3")
"""Pieces of the passwords below, none of which any message may show."""
UNESCAPED_PASSWORDS = [
    "redis://:Qz9/Xv7k@127.0.0.1:6379/0",
    "redis://:Qz9#Xv7k@127.0.0.1:6379/0",
    "rediss://:Qz9?Xv7k@127.0.0.1:6380",
    "redis://default:Qz9/Xv7k#Jw3?@127.0.0.1:6379/0",
    "redis://default:1234/Xv7k@127.0.0.1:6379",  # would parse as host 'default', port 1234
    "unix://:Qz9#Xv7k@/run/redis.sock",
]
"""Redis URLs whose password holds an unescaped '/', '#' or '?'."""


class Cutter:
    """A TCP forwarder on 127.0.0.1 to the gateway whose connections can be cut at once, as those
    of a replica that dies behind a balancer are; it goes on accepting new ones."""

    def __init__(self, upstream: int) -> None:
        self._upstream = upstream
        self._transports: list[asyncio.WriteTransport] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Cutter:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        self._transports += [writer.transport, up_writer.transport]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def cut(self) -> None:
        """Reset every connection made so far, both ways."""
        for transport in self._transports:
            transport.abort()
        self._transports.clear()


BUSY_LUA = """
local function now() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local stop = now() + tonumber(ARGV[1])
while now() < stop do end
return 1
"""
"""A script that keeps Redis busy for ARGV[1] ms: commands sent meanwhile run after it, though
their clients have given up waiting."""
