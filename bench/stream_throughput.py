"""Gateway throughput, CPU per recipient and memory flatness against the direct-REST ceiling.

Everything runs on 127.0.0.1, each part in its own process: the fake Braze, the gateway,
and this client. In one run it measures:

  direct   N recipients posted straight to the fake Braze in calls of 50, `--concurrency`
           calls in flight, bodies pre-encoded: the ceiling a hand-written client reaches.
  stream   the same N recipients through the gateway's SendStream, in chunks.
  unary    10,000 recipients through one Send.

and prints ratios from that one run (machines here are noisy; compare within a run):
gateway/direct throughput, the gateway's CPU microseconds per recipient, and its resident
memory late in the stream over early in the stream (1.0 = flat).

    .venv/bin/python bench/stream_throughput.py --recipients 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fake_braze_command(port: int, latency_ms: float = 0.0) -> list[str]:
    """The fake Braze as its own process: the benchmark key, no recording, no real budget."""
    return [
        *(sys.executable, "-m", "fake_braze", "--port", str(port)),
        *("--api-key", KEY, "--no-record", "--hourly-limit", str(10**9), "--latency-ms", str(latency_ms)),
    ]


def write_tenants(folder: Path, url: str) -> Path:
    """A tenants file with the one benchmark tenant, sending to `url`."""
    tenants = folder / "tenants.toml"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    tenants.write_text(
        f'[tenants.bench]\ntoken_sha256 = ["{digest}"]\nbraze_rest_url = "{url}"\nbraze_api_key = "{KEY}"\n'
    )
    return tenants


def recipient(i: int) -> dict[str, object]:
    return {"external_user_id": f"user-{i}", "context": {"order": i}}


async def wait_port(port: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


async def direct(url: str, n: int, concurrency: int) -> float:
    """Post N recipients in calls of 50 straight to the fake; returns recipients/s."""
    head = {"canvas_id": CANVAS, "context": CONTEXT}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def call(start: int) -> None:
            body = orjson.dumps(
                {**head, "recipients": [recipient(i) for i in range(start, min(start + 50, n))]}
            )
            try:
                async with session.post(url + "/canvas/trigger/send", data=body, headers=headers) as reply:
                    await reply.read()
                    assert reply.status == 201, reply.status
            finally:
                slots.release()

        began = time.perf_counter()
        tasks = []
        for start in range(0, n, 50):
            await slots.acquire()
            tasks.append(asyncio.create_task(call(start)))
        await asyncio.gather(*tasks)
        return n / (time.perf_counter() - began)


async def requests(n: int, chunk: int) -> AsyncIterator[pb.SendStreamRequest]:
    header = pb.CanvasTrigger(canvas_id=CANVAS)
    header.context.update(CONTEXT)
    yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=header))
    for start in range(0, n, chunk):
        message = pb.SendStreamRequest()
        for i in range(start, min(start + chunk, n)):
            r = message.chunk.recipients.add(external_user_id=f"user-{i}")
            r.context.update({"order": i})
        yield message


async def stream(target: str, n: int, chunk: int, gateway_pid: int) -> tuple[float, float, float, float]:
    """SendStream N recipients; returns (recipients/s, CPU us/recipient, early RSS, late RSS)."""
    seen = 0
    early = late = 0.0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CanvasGatewayServiceStub(channel)
        cpu_before = cpu_seconds(gateway_pid)
        began = time.perf_counter()
        async for response in stub.SendStream(
            requests(n, chunk), metadata=(("authorization", f"Bearer {TOKEN}"),)
        ):
            if response.HasField("result"):
                assert response.result.outcome == pb.OUTCOME_SENT, response.result
                seen += len(response.result.positions)
                if not early and seen >= n // 5:
                    early = rss_mib(gateway_pid)
            else:
                assert response.summary.recipients_sent == n, response.summary
        elapsed = time.perf_counter() - began
        late = rss_mib(gateway_pid)
        cpu = cpu_seconds(gateway_pid) - cpu_before
    assert seen == n
    return n / elapsed, cpu / n * 1e6, early, late


async def unary(target: str, n: int) -> float:
    trigger = pb.CanvasTrigger(canvas_id=CANVAS)
    trigger.context.update(CONTEXT)
    for i in range(n):
        trigger.recipients.add(external_user_id=f"user-{i}").context.update({"order": i})
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CanvasGatewayServiceStub(channel)
        began = time.perf_counter()
        reply = await stub.Send(
            pb.SendRequest(trigger=trigger), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        elapsed = time.perf_counter() - began
    assert reply.summary.recipients_sent == n
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight (gateway: per request)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fake Braze latency per call")
    args = parser.parse_args()

    fake_port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{fake_port}"
    with tempfile.TemporaryDirectory() as tmp:
        tenants = write_tenants(Path(tmp), url)
        env = {
            **os.environ,
            "CGW_TENANTS_FILE": str(tenants),
            "CGW_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
            "CGW_ADMIN_ADDRESS": "127.0.0.1:0",
            "CGW_REQUEST_CONCURRENCY": str(args.concurrency),
            "CGW_LOG_LEVEL": "WARNING",
        }
        fake = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measuring
            fake_braze_command(fake_port, args.latency_ms), stdout=subprocess.DEVNULL
        )
        gateway = subprocess.Popen([sys.executable, "-m", "canvas_gateway_server"], env=env)  # noqa: ASYNC220
        try:
            await wait_port(fake_port)
            await wait_port(grpc_port)
            target = f"127.0.0.1:{grpc_port}"
            await stream(target, 5_000, args.chunk, gateway.pid)  # warm up both
            await direct(url, 5_000, args.concurrency)

            n = args.recipients
            ceiling = await direct(url, n, args.concurrency)
            rate, cpu_us, early, late = await stream(target, n, args.chunk, gateway.pid)
            stream_10k, _, _, _ = await stream(target, 10_000, args.chunk, gateway.pid)
            unary_10k = await unary(target, 10_000)
        finally:
            for process in (gateway, fake):
                process.terminate()
                process.wait(timeout=30)

    print(f"recipients per run              {n:>12,}   (fake Braze latency {args.latency_ms:g} ms)")
    print(f"direct REST ceiling             {ceiling:>12,.0f} recipients/s")
    print(f"gateway SendStream              {rate:>12,.0f} recipients/s")
    print(f"gateway SendStream, 10,000      {stream_10k:>12,.0f} recipients/s")
    print(f"gateway Send (unary), 10,000    {unary_10k:>12,.0f} recipients/s")
    print(f"gateway CPU per recipient       {cpu_us:>12.1f} us")
    print(f"gateway RSS at 20% / at 100%    {early:>8.1f} / {late:.1f} MiB")
    print(f"ratio gateway / direct          {rate / ceiling:>12.2f}")
    print(f"ratio RSS end / RSS at 20%      {late / early:>12.2f}")


if __name__ == "__main__":
    asyncio.run(main())
