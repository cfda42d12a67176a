"""Memory: the gateway's peak resident memory for a 100,000 and a 1,000,000-recipient SendStream.

Each stream runs in a fresh gateway (its own `stack()`), so that the peak (VmHWM, summed over
the gateway's process tree) is the peak of that one stream: first a 1,000-recipient warm-up
stream, so that both gateways pay the same start-up cost, then the measured stream on the same
channel (so on the same worker, when the gateway runs several), then the peak is read. A
gateway whose memory does not grow with the stream's length shows a ratio peak(1M) / peak(100k)
near 1; the issue's bar is 1.2.

With several worker processes the tree's sum includes the workers that served nothing, which
pulls the ratio toward 1; so the peak of the largest single process is given too.

The chunks are serialised as the stream asks for them (`LazyChunks`), not all ahead of time, so
that this client does not hold a million recipients; that encoding (about 1 ms per 500
recipients) shares the machine with the gateway while its throughput is measured.

    .venv/bin/python bench/suite.py --only memory --out -
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import overload

import grpc
from harness import Figure, chunk, encoded_chunks, peak_rss_mib, process_tree, stack, stream

MEASURE = "memory"
CHUNK = 500
WARMUP = 1_000
FULL = (100_000, 1_000_000)
SMOKE = (2_000, 20_000)


class LazyChunks(Sequence[bytes]):
    """The serialised chunks of a stream of N recipients (positions `offset`..), each built when
    it is read: `harness.encoded_chunks` without holding them all."""

    def __init__(self, n: int, size: int, offset: int = 0) -> None:
        self.starts = range(offset, offset + n, size)
        self.end = offset + n
        self.size = size

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start = self.starts[index]
        return chunk(range(start, min(start + self.size, self.end))).SerializeToString()


def largest_peak_mib(pid: int) -> float:
    """The largest VmHWM of any one process of the tree (the worker that served the stream)."""
    peaks = []
    for each in process_tree(pid):
        try:
            lines = Path(f"/proc/{each}/status").read_text().splitlines()
        except OSError:
            continue
        peaks += [int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")]
    return max(peaks, default=0.0)


async def one(n: int) -> tuple[float, float, float, float, int]:
    """A fresh gateway; a warm-up stream, then N recipients. Returns (peak after the warm-up,
    peak after the stream, largest process's peak after the stream, recipients/s, processes)."""
    async with stack() as running:
        pid = running.gateway.pid
        async with grpc.aio.insecure_channel(running.target) as channel:
            await stream(
                running.target, WARMUP, CHUNK, pid, chunks=encoded_chunks(WARMUP, CHUNK), channel=channel
            )
            warm = peak_rss_mib(pid)
            run = await stream(running.target, n, CHUNK, pid, chunks=LazyChunks(n, CHUNK), channel=channel)
        return warm, peak_rss_mib(pid), largest_peak_mib(pid), run.rate, len(process_tree(pid))


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1_000}k"


async def measure(smoke: bool) -> list[Figure]:
    small, large = SMOKE if smoke else FULL
    found: list[Figure] = []
    peaks: dict[int, tuple[float, float]] = {}
    processes = 1
    for n in (small, large):
        warm, peak, largest, rate, processes = await one(n)
        peaks[n] = (peak, largest)
        found += [
            Figure(MEASURE, f"peak RSS after the {WARMUP:,}-recipient warm-up ({label(n)} run)", warm, "MiB"),
            Figure(MEASURE, f"peak RSS, {n:,}-recipient stream", peak, "MiB"),
        ]
    found.append(
        Figure(
            MEASURE,
            f"ratio peak {label(large)} / peak {label(small)}",
            peaks[large][0] / peaks[small][0],
            "x",
            "<= 1.2",
        )
    )
    if processes > 1:
        found += [
            Figure(
                MEASURE,
                f"largest process's peak RSS, {label(n)} stream ({processes} processes)",
                peaks[n][1],
                "MiB",
            )
            for n in (small, large)
        ]
        found.append(
            Figure(
                MEASURE,
                f"ratio largest process's peak {label(large)} / {label(small)}",
                peaks[large][1] / peaks[small][1],
                "x",
                "<= 1.2",
            )
        )
    found.append(Figure(MEASURE, f"gateway throughput, {large:,}-recipient stream", rate, "recipients/s"))
    return found
