"""Lanes: unary sends beside a bulk stream on one Braze workspace (docs/budgets.md).

The fake's recipient budget is L calls a window of W seconds; the workspace keeps a
`transactional_reserve` of R calls that bulk calls never take. Tenant `bench` sends one SendStream
(bulk) of at least 20 windows' worth of calls; tenant `otp`, on the same workspace, sends a
trickle of one-recipient unary Sends (transactional), one every TRICKLE_SECONDS. The same trickle
is first sent with no stream. From one run:

  unary p50 / p99     latency of the trickle's Sends, without and with the stream (and the ratio)
  unary waits         canvas_gateway_rate_limit_wait_seconds_total{tenant="otp"}: 0 means no
                      unary Send ever waited for budget
  bulk share          over the windows the stream covered whole, its calls / (L - R): the share
                      of what is above the transactional reserve it used
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
import time
from typing import Any

import aiohttp
import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from harness import CANVAS, KEY, Figure, encoded_chunks, stack, stream, stub

MEASURE = "lanes"
OTP_TOKEN = "bench-otp-token"
TRICKLE_SECONDS = 0.25
"""4 Sends a window of 1 s: within the transactional reserve, as one-time passwords should be."""


def tenants_toml(reserve: int) -> str:
    """`bench` (the stream) and `otp` on workspace `shop`, with the transactional reserve."""
    digest = hashlib.sha256(OTP_TOKEN.encode()).hexdigest()
    return (
        'workspace = "shop"\n\n'
        f'[tenants.otp]\ntoken_sha256 = ["{digest}"]\nworkspace = "shop"\n'
        f'braze_rest_url = "{{braze_rest_url}}"\nbraze_api_key = "{KEY}"\n\n'
        f"[workspaces.shop]\ntransactional_reserve = {reserve}\n"
    )


async def trickle(target: str, count: int, until: asyncio.Future[Any] | None = None) -> list[float]:
    """`count` one-recipient Sends as `otp`, one every TRICKLE_SECONDS; each one's latency (s)."""
    took = []
    async with grpc.aio.insecure_channel(target) as channel:
        send = stub(channel).Send
        auth = (("authorization", f"Bearer {OTP_TOKEN}"),)
        for i in range(count):
            if until is not None and until.done():
                break
            request = pb.SendRequest(
                trigger=pb.CanvasTrigger(
                    canvas_id=CANVAS, recipients=[pb.Recipient(external_user_id=f"otp-{i}")]
                )
            )
            began = time.perf_counter()
            reply: pb.SendResponse = await send(request, metadata=auth, timeout=30)  # type: ignore[misc]
            took.append(time.perf_counter() - began)
            assert reply.results[0].outcome == pb.OUTCOME_SENT, reply
            await asyncio.sleep(TRICKLE_SECONDS)
    return took


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def fetch(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        return await reply.text()


def waited(metrics: str, tenant: str) -> float:
    prefix = f'canvas_gateway_rate_limit_wait_seconds_total{{tenant="{tenant}"}}'
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


async def measure(smoke: bool) -> list[Figure]:
    limit, window, reserve, windows, count = (20, 1, 5, 2, 4) if smoke else (50, 1, 10, 20, 60)
    fake_args = ["--hourly-limit", str(limit), "--hourly-window-seconds", str(window)]
    settings = {"CGW_MAX_RETRY_WAIT_SECONDS": str(window + 5)}
    toml = tenants_toml(reserve)
    async with stack(settings, fake_args=fake_args, record=True, tenant_toml=toml) as running:
        alone = await trickle(running.target, count)
        await asyncio.sleep(window - time.time() % window + 0.05)  # the stream starts a window
        n = 50 * limit * windows
        bulk = asyncio.ensure_future(
            stream(running.target, n, 500, running.gateway.pid, chunks=encoded_chunks(n, 500))
        )
        beside = await trickle(running.target, count * 100, until=bulk)
        await bulk
        metrics = await fetch(f"http://{running.admin}/metrics")
        async with aiohttp.ClientSession() as session, session.get(f"{running.url}/_fake/calls") as reply:
            record = (await reply.json())["calls"]
    by_window: dict[int, list[int]] = {}
    began = min(
        call["received_at"]
        for call in record
        if call["body"]["recipients"][0]["external_user_id"].startswith("user-")
    )
    for call in record:
        if call["status"] != 201 or call["received_at"] < began:
            continue
        bulk_call = call["body"]["recipients"][0]["external_user_id"].startswith("user-")
        counts = by_window.setdefault(math.floor(call["received_at"] / window), [0, 0])
        counts[0 if bulk_call else 1] += 1
    whole = [by_window[w] for w in sorted(by_window)[1:-1]]
    share = (
        statistics.fmean(bulk_calls / (limit - reserve) for bulk_calls, _ in whole) * 100 if whole else 0.0
    )
    p50, p99 = quantile(alone, 0.5) * 1000, quantile(alone, 0.99) * 1000
    b50, b99 = quantile(beside, 0.5) * 1000, quantile(beside, 0.99) * 1000
    what = f"{limit} calls / {window} s, transactional_reserve {reserve}"
    return [
        Figure(MEASURE, f"unary p50, no bulk stream ({len(alone)} Sends)", p50, "ms"),
        Figure(MEASURE, f"unary p99, no bulk stream ({len(alone)} Sends)", p99, "ms"),
        Figure(MEASURE, f"unary p50 beside a bulk stream ({len(beside)} Sends)", b50, "ms"),
        Figure(
            MEASURE, f"unary p99 beside a bulk stream ({len(beside)} Sends)", b99, "ms", "within a few ms"
        ),
        Figure(MEASURE, "unary p99 beside / without the stream", b99 / p99, "x"),
        Figure(MEASURE, "unary p99 beside minus without the stream", b99 - p99, "ms", "a few ms"),
        Figure(MEASURE, "time unary Sends waited for budget", waited(metrics, "otp"), "s", "0"),
        Figure(
            MEASURE,
            f"bulk share of the room above the reserve, {len(whole)} whole windows, {what}",
            share,
            "%",
            "~100%",
        ),
    ]
