"""Budget use: a tenant limited at the fake Braze to N calls a window, and a stream that needs more.

The fake's recipient budget is N calls per window of W seconds (`--hourly-window-seconds`, the
clock hour shortened), recording every call. One SendStream carries enough recipients for
more windows than are measured; the gateway spends each window's budget, pauses until its
reset (x-ratelimit-reset) and goes on. From the fake's record, over the windows the stream
covered from start to end (not the first, which it entered part-way, nor the last):

  use          201 answers / N, over those windows (the issue's target: >= 97%)
  429s         every call answered 429
  avoidable    429s received after the window's last 201 (whose x-ratelimit-remaining said 0):
               an upper bound on the calls made after the headers said the budget was spent

Run with 1 worker, and with 2 workers over 2 connections (the workers share what each budget has
left and their calls under way).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import aiohttp
import grpc
from harness import Figure, encoded_chunks, stack, stream

MEASURE = "budget_use"


async def calls(url: str) -> list[tuple[float, int]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_fake/calls") as reply:
        recorded = (await reply.json())["calls"]
    return sorted((call["received_at"], call["status"]) for call in recorded)


def tally(record: list[tuple[float, int]], window: int, limit: int) -> tuple[float, int, int, int]:
    """(use over the full windows, 429s, avoidable 429s, full windows)."""
    by_window: dict[int, list[tuple[float, int]]] = {}
    for at, status in record:
        by_window.setdefault(math.floor(at / window), []).append((at, status))
    full = sorted(by_window)[1:-1]
    sent = sum(Counter(status for _, status in by_window[w])[201] for w in full)
    limited = avoidable = 0
    for each in by_window.values():
        last_sent = max((at for at, status in each if status == 201), default=math.inf)
        spent = last_sent if sum(status == 201 for _, status in each) >= limit else math.inf
        limited += sum(status == 429 for _, status in each)
        avoidable += sum(status == 429 and at > spent for at, status in each)
    return (sent / (limit * len(full)) * 100 if full else 0.0), limited, avoidable, len(full)


async def run(
    workers: int, connections: int, limit: int, window: int, windows: int
) -> tuple[float, int, int, int]:
    fake_args = ["--hourly-limit", str(limit), "--hourly-window-seconds", str(window)]
    settings = {"CGW_WORKERS": str(workers), "CGW_MAX_RETRY_WAIT_SECONDS": str(window + 5)}
    async with stack(settings, fake_args=fake_args, record=True) as running:
        # Start just after a window opens, so that the first (partial) window is short.
        await asyncio.sleep(window - time.time() % window + 0.05)
        per = 50 * limit * (windows + 2) // connections  # more than the windows measured can take
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(running.target, options=options) for _ in range(connections)]
        try:
            await asyncio.gather(
                *(
                    asyncio.wait_for(
                        stream(
                            running.target,
                            per,
                            500,
                            running.gateway.pid,
                            chunks=encoded_chunks(per, 500, offset=i * per),
                            channel=channel,
                            all_sent=False,  # with 2 workers a 429 may outlast its retries
                        ),
                        timeout=window * (windows + 4),
                    )
                    for i, channel in enumerate(channels)
                )
            )
        finally:
            for channel in channels:
                await channel.close()
        return tally(await calls(running.url), window, limit)


async def measure(smoke: bool) -> list[Figure]:
    limit, window, windows = (20, 2, 1) if smoke else (300, 5, 4)
    figures = []
    for workers, connections in ((1, 1), (2, 2)):
        use, limited, avoidable, full = await run(workers, connections, limit, window, windows)
        what = f"{workers} worker{'s' if workers > 1 else ''}, {limit} calls / {window} s"
        figures += [
            Figure(MEASURE, f"budget used over {full} full windows, {what}", use, "%", ">= 97%"),
            Figure(MEASURE, f"429s, {what}", limited, "calls"),
            Figure(MEASURE, f"avoidable 429s, {what}", avoidable, "calls", "0"),
        ]
    return figures
