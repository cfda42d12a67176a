"""What every benchmark shares: processes on 127.0.0.1, their CPU and memory, and the figures.

Each measure runs the fake Braze and the gateway as processes of their own (`Stack`), drives
them from this process, and returns `Figure`s; `suite.py` runs every measure and writes the
table to BENCHMARKS.md. Machines here are noisy, so a figure worth reading is a ratio of two
things measured in the same run.

CPU is read from /proc (utime + stime, every thread), for a process and its children: the
gateway with several workers is a process tree.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import orjson
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc

TOKEN = "bench-token"
KEY = "bench-braze-key"
CANVAS = "8c7c2864-26b2-4ad0-97ec-48cddfd497d7"
CONTEXT = {"campaign": "bench", "price": 12}
TICKS = os.sysconf("SC_CLK_TCK")
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TRIGGER_PATH = "/canvas/trigger/send"


@dataclass(frozen=True)
class Figure:
    """One row of BENCHMARKS.md. `target` is the issue's bar, where it sets one ("<= 1.5")."""

    measure: str
    name: str
    value: float
    unit: str
    target: str = ""

    def text(self) -> str:
        if self.unit == "x":
            return f"{self.value:.2f}x"
        if self.unit == "%":
            return f"{self.value:.1f}%"
        number = f"{self.value:,.0f}" if abs(self.value) >= 100 else f"{self.value:.2f}"
        return f"{number} {self.unit}"


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant of it."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            todo.extend(_children(current))
        except OSError:
            continue
    return tree


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """utime + stime of `pid` (and, with `tree`, of its live descendants)."""
    total = 0.0
    for each in process_tree(pid) if tree else [pid]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def rss_mib(pid: int) -> float:
    """Resident memory now, summed over the process tree."""
    return sum(_status_kib(each, "VmRSS:") for each in process_tree(pid)) / 1024


def peak_rss_mib(pid: int) -> float:
    """The high-water mark of resident memory (VmHWM), summed over the process tree."""
    return sum(_status_kib(each, "VmHWM:") for each in process_tree(pid)) / 1024


async def wait_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


async def wait_ready(admin: str, seconds: float = 30) -> None:
    """Until the gateway's /readyz says ready (every worker, with several)."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://{admin}/readyz") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the gateway at {admin} never became ready")


async def pinned_gateway(
    tenants: Path, extra: Mapping[str, str], cores: set[int]
) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway process held to `cores`, once it is ready: (the process, its gRPC target)."""
    port, admin = free_port(), free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - started before any measuring
        [sys.executable, "-m", "canvas_gateway_server"],
        env=gateway_env(tenants, port, extra, admin),
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    await wait_ready(f"127.0.0.1:{admin}")
    return process, f"127.0.0.1:{port}"


def fake_braze_command(
    port: int, latency_ms: float = 0.0, extra: Sequence[str] = (), record: bool = False
) -> list[str]:
    """The fake Braze as its own process: the benchmark key, no recording (unless `record`: every
    call at /_fake/calls), no real budget unless `extra` sets one."""
    return [
        *(sys.executable, "-m", "fake_braze", "--port", str(port)),
        *("--api-key", KEY, "--latency-ms", str(latency_ms)),
        *(() if record else ("--no-record",)),
        *(extra or ("--hourly-limit", str(10**9))),
    ]


def write_tenants(folder: Path, url: str, extra: str = "") -> Path:
    """A tenants file with the one benchmark tenant, sending to `url` (`extra`: more TOML lines,
    where `{braze_rest_url}` is `url`)."""
    tenants = folder / "tenants.toml"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    tenants.write_text(
        f'[tenants.bench]\ntoken_sha256 = ["{digest}"]\nbraze_rest_url = "{url}"\n'
        f'braze_api_key = "{KEY}"\n{extra.replace("{braze_rest_url}", url)}'
    )
    return tenants


def gateway_env(
    tenants: Path, grpc_port: int, extra: Mapping[str, str] | None = None, admin_port: int = 0
) -> dict[str, str]:
    """The environment of a benchmark gateway: the caller's, without its CGW_ settings; one
    worker unless `extra` says otherwise (CGW_WORKERS)."""
    return {
        **{key: value for key, value in os.environ.items() if not key.startswith("CGW_")},
        "CGW_TENANTS_FILE": str(tenants),
        "CGW_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "CGW_ADMIN_ADDRESS": f"127.0.0.1:{admin_port}",
        "CGW_WORKERS": "1",
        "CGW_LOG_LEVEL": "WARNING",
        "CGW_SHUTDOWN_DELAY_SECONDS": "0",
        "CGW_IDEMPOTENCY_FILE": str(tenants.parent / f"keys-{grpc_port}.sqlite3"),  # not in /tmp
        **(extra or {}),
    }


@dataclass
class Stack:
    """A fake Braze and a gateway in front of it, each its own process."""

    url: str
    target: str
    fake: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    folder: Path
    grpc_port: int
    admin: str
    """host:port of the gateway's admin listener (/metrics, /readyz)"""
    extra_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


@asynccontextmanager
async def stack(
    gateway: Mapping[str, str] | None = None,
    fake_args: Sequence[str] = (),
    latency_ms: float = 0.0,
    tenant_toml: str = "",
    record: bool = False,
) -> AsyncIterator[Stack]:
    """Start the fake Braze and a gateway (settings in `gateway`); stop both after."""
    fake_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{fake_port}"
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), url, tenant_toml)
        fake = subprocess.Popen(  # noqa: ASYNC220 - started before anything is measured
            fake_braze_command(fake_port, latency_ms, fake_args, record), stdout=subprocess.DEVNULL
        )
        process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "canvas_gateway_server"],
            env=gateway_env(tenants, grpc_port, gateway, admin_port),
        )
        admin = f"127.0.0.1:{admin_port}"
        running = Stack(url, f"127.0.0.1:{grpc_port}", fake, process, Path(tmp), grpc_port, admin)
        try:
            await wait_port(fake_port)
            await wait_ready(admin)
            yield running
        finally:
            for each in (process, fake, *running.extra_processes):
                each.terminate()
            for each in (process, fake, *running.extra_processes):
                try:
                    each.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    each.kill()


async def another_gateway(running: Stack, settings: Mapping[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    """A second gateway in `running`'s stack (same fake, same tenants) with `settings`, stopped
    with the stack: its gRPC target and its process."""
    grpc_port, admin_port = free_port(), free_port()
    tenants = running.folder / "tenants.toml"
    process = subprocess.Popen(  # noqa: ASYNC220 - started before anything is measured
        [sys.executable, "-m", "canvas_gateway_server"],
        env=gateway_env(tenants, grpc_port, settings, admin_port),
    )
    running.extra_processes.append(process)
    await wait_ready(f"127.0.0.1:{admin_port}")
    return f"127.0.0.1:{grpc_port}", process


# --- load -----------------------------------------------------------------------------------


def recipient(i: int) -> dict[str, object]:
    return {"external_user_id": f"user-{i}", "context": {"order": i}}


HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


async def direct(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """The hand-written client: N recipients posted straight to the fake in calls of 50,
    `concurrency` calls in flight over pooled keep-alive aiohttp connections, each body built
    and encoded with orjson as it is sent. Returns (recipients/s, this process's CPU us per
    recipient): run it with nothing else busy in this process."""
    head = {"canvas_id": CANVAS, "context": CONTEXT}
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def call(start: int) -> None:
            body = orjson.dumps(
                {**head, "recipients": [recipient(i) for i in range(start, min(start + 50, n))]}
            )
            try:
                async with session.post(url + TRIGGER_PATH, data=body, headers=HEADERS) as reply:
                    await reply.read()
                    assert reply.status == 201, reply.status
            finally:
                slots.release()

        cpu, began = time.process_time(), time.perf_counter()
        tasks = []
        for start in range(0, n, 50):
            await slots.acquire()
            tasks.append(asyncio.create_task(call(start)))
        await asyncio.gather(*tasks)
        return n / (time.perf_counter() - began), (time.process_time() - cpu) / n * 1e6


def stream_header(validate_only: bool = False) -> pb.SendStreamRequest:
    trigger = pb.CanvasTrigger(canvas_id=CANVAS)
    trigger.context.update(CONTEXT)
    options = pb.SendOptions(validate_only=validate_only)
    return pb.SendStreamRequest(header=pb.StreamHeader(trigger=trigger, options=options))


def chunk(positions: Iterable[int]) -> pb.SendStreamRequest:
    message = pb.SendStreamRequest()
    for i in positions:
        message.chunk.recipients.add(external_user_id=f"user-{i}").context.update({"order": i})
    return message


def encoded_chunks(n: int, size: int, offset: int = 0) -> list[bytes]:
    """The chunks of a stream of N recipients, serialised ahead of time, so that building
    them costs nothing while the gateway is measured."""
    return [
        chunk(range(start, min(start + size, offset + n))).SerializeToString()
        for start in range(offset, offset + n, size)
    ]


@dataclass
class StreamRun:
    rate: float
    """recipients/s"""
    gateway_cpu_us: float
    """gateway CPU (all its processes) per recipient"""
    sent: int


async def stream(
    target: str,
    n: int,
    size: int,
    gateway_pid: int,
    *,
    validate_only: bool = False,
    chunks: Sequence[bytes] | None = None,
    channel: grpc.aio.Channel | None = None,
    all_sent: bool = True,
) -> StreamRun:
    """One SendStream of N recipients in chunks of `size`; every recipient must get one result,
    and (with `all_sent`) every result must be SENT (NOT_ATTEMPTED for validate_only)."""
    parts = chunks if chunks is not None else encoded_chunks(n, size)
    header = stream_header(validate_only).SerializeToString()
    expected = pb.OUTCOME_NOT_ATTEMPTED if validate_only else pb.OUTCOME_SENT

    async def requests() -> AsyncIterator[bytes]:
        yield header
        for part in parts:
            yield part

    own = channel or grpc.aio.insecure_channel(target)
    try:
        method = own.stream_stream(
            "/canvas_gateway.v1.CanvasGatewayService/SendStream",
            request_serializer=None,
            response_deserializer=pb.SendStreamResponse.FromString,
        )
        seen = 0
        cpu, began = cpu_seconds(gateway_pid), time.perf_counter()
        async for response in method(requests(), metadata=AUTH):
            if response.HasField("result"):
                assert response.result.outcome == expected or not all_sent, response.result
                seen += len(response.result.positions)
            elif response.HasField("summary"):  # a message with no part is skipped
                assert response.summary.recipients == n, response.summary
        elapsed = time.perf_counter() - began
        used = cpu_seconds(gateway_pid) - cpu
    finally:
        if channel is None:
            await own.close()
    assert seen == n, (seen, n)
    return StreamRun(n / elapsed, used / n * 1e6, seen)


def stub(channel: grpc.aio.Channel) -> pb_grpc.CanvasGatewayServiceStub:
    return pb_grpc.CanvasGatewayServiceStub(channel)
