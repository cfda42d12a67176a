"""The supervisor's admin address: what it shows of its workers (`workers`).

Each worker's admin listener is a Unix socket in the supervisor's private folder; the
supervisor's `/metrics` is every worker's exposition with a `worker` label added, `/readyz` is
ready when every worker is, `/healthz` when every worker is alive.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence
from typing import Protocol

import aiohttp
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .admin import AdminServer


class Workers(Protocol):
    """The supervisor's set of workers, as its admin address sees it."""

    count: int
    folder: str
    stopping: bool

    def alive(self) -> bool: ...


def admin_socket(folder: str, index: int) -> str:
    return os.path.join(folder, f"admin-{index}.sock")


class WorkerAdmin:
    """What the supervisor's admin address shows of its workers: their metrics merged, their
    readiness combined, their liveness."""

    def __init__(self, workers: Workers) -> None:
        self._workers = workers
        self.server = AdminServer(self.metrics, self.readiness, self.liveness)

    async def _get(self, index: int, path: str) -> tuple[int, str]:
        """One worker's admin answer; (0, why) when it cannot be reached."""
        connector = aiohttp.UnixConnector(path=admin_socket(self._workers.folder, index))
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(f"http://worker{path}", timeout=aiohttp.ClientTimeout(total=5)) as reply,
            ):
                return reply.status, await reply.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"worker {index} unreachable ({type(exc).__name__})"

    async def _all(self, path: str) -> list[tuple[int, str]]:
        return await asyncio.gather(*(self._get(index, path) for index in range(self._workers.count)))

    async def metrics(self, _: str) -> tuple[bytes, str]:
        answers = await self._all("/metrics")
        text = merge_expositions([body if status == 200 else "" for status, body in answers])
        return text.encode(), CONTENT_TYPE_LATEST

    async def liveness(self) -> str | None:
        return None if self._workers.alive() else "a worker has exited"

    async def readiness(self) -> str | None:
        if self._workers.stopping:
            return "draining: the gateway is shutting down"
        for index, (status, body) in enumerate(await self._all("/readyz")):
            if status != 200:
                return f"worker {index}: {body.strip().removeprefix('not ready: ')}"
        return None


def merge_expositions(texts: Sequence[str]) -> str:
    """Prometheus text expositions of the workers as one, each sample labelled with its worker.

    Families keep their HELP and TYPE once; a worker that could not be reached adds nothing
    (its series go missing, which `up`-style alerts on the supervisor's series would show)."""
    families: dict[str, tuple[str, str, list[Sample]]] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            kept = families.setdefault(family.name, (family.documentation, family.type, []))
            for sample in family.samples:
                kept[2].append(sample._replace(labels={**sample.labels, "worker": str(index)}))
    lines: list[str] = []
    for name, (documentation, kind, samples) in families.items():
        exposed = f"{name}_total" if kind == "counter" else name  # the parser reads info as gauge
        help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines.append(f"# HELP {exposed} {help_text}")
        lines.append(f"# TYPE {exposed} {kind}")
        for sample in samples:
            pairs = ",".join(f'{key}="{_escape(value)}"' for key, value in sample.labels.items())
            lines.append(f"{sample.name}{{{pairs}}} {_number(sample.value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    return repr(float(value))
