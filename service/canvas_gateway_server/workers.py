"""Several worker processes on one host: one gRPC port, one admin port, budgets kept right.

A Python process runs on one core, so with `CGW_WORKERS` above 1 `__main__` runs `supervise`
instead of a gateway. The supervisor starts that many workers (each a whole gateway, started
as a fresh `python -m canvas_gateway_server`, never forked: gRPC cannot survive a fork) and:

- the workers all listen on the gRPC port with SO_REUSEPORT; the kernel gives each new
  *connection* to one of them, so a caller spreads over the workers only with several
  connections (see docs/operations.md, "Workers");
- each worker's admin listener is a Unix socket in a private folder; the supervisor serves
  the admin address: `/metrics` is every worker's exposition with a `worker` label added,
  `/readyz` is ready when every worker is, `/healthz` when every worker is alive;
- SIGTERM and SIGINT drain every worker (each drains as a single gateway does), SIGHUP
  reloads every worker's tenants (a worker starts with it ignored until its `main` catches it,
  see `hangups`); when a worker dies unbidden, the others are drained and the
  supervisor exits 1, so that the orchestrator restarts the whole set;
- per-tenant limits stay right: concurrency is divided (each worker allows its share, at
  least one), and what is known of each Braze budget (a pause until the reset, what the last
  headers said is left, the calls under way) is shared through `SharedBudgets`, a small file
  every worker maps, so the workers together never start more calls than a budget has left;
- idempotency keys work as with one process: without Redis the supervisor makes the host's
  SQLite file (`host_results`) before the workers start, and every worker keeps its claims and
  results there, so a repeat that reaches another worker finds them (and a restart too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import math
import mmap
import os
import signal
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar

import aiohttp
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from . import host_results, logs
from .admin import AdminServer
from .hangups import Hangups
from .limits import Budget
from .settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

STOP_SECONDS: Final = 60.0
"""How long the supervisor waits for a worker to exit after SIGTERM before it kills it; longer
than a worker's own drain (shutdown delay + grace + abandon)."""
_PR_SET_PDEATHSIG: Final = 1
_SLOTS: Final = 4096
_RECORD: Final = struct.Struct("<Qdqqqq")
T = TypeVar("T")


def cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup (v2) CPU quota."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def worker_count(settings: Settings) -> int:
    """How many workers to run: CGW_WORKERS, 0 meaning one per core; the demo runs one."""
    if settings.demo:
        return 1
    return settings.workers or cores()


def admin_socket(folder: str, index: int) -> str:
    return os.path.join(folder, f"admin-{index}.sock")


def budgets_path(folder: str) -> str:
    return os.path.join(folder, "budgets")


# --- shared budgets -------------------------------------------------------------------------


class SharedBudgets:
    """The `Budget`s of a host's workers, in a file each of them maps (a `BudgetStore`).

    4,096 slots of (key hash, pause, reset, left, calls under way, limit); every update is one
    read-modify-write under an exclusive `flock` on the file, a few microseconds, so the workers
    together never start more calls than a budget has left. Two keys that hash to one slot take
    it from each other: the one that loses it knows nothing of its budget until its next reply
    (it behaves as at start-up), and nothing is ever invented for the other.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "r+b")  # noqa: SIM115 - held for the life of the worker
        self._map = mmap.mmap(self._file.fileno(), _SLOTS * _RECORD.size)
        self._slots: dict[tuple[str, bool], tuple[int, int]] = {}

    @staticmethod
    def create(path: str) -> None:
        with open(path, "wb") as file:
            file.truncate(_SLOTS * _RECORD.size)

    def _slot(self, key: tuple[str, bool]) -> tuple[int, int]:
        found = self._slots.get(key)
        if found is None:
            digest = hashlib.blake2b(f"{key[0]}\0{key[1]}".encode(), digest_size=8).digest()
            tag = int.from_bytes(digest, "little") or 1  # 0 marks an empty slot
            found = self._slots[key] = (tag % _SLOTS * _RECORD.size, tag)
        return found

    def update(self, key: tuple[str, bool], change: Callable[[Budget], T]) -> T:
        offset, tag = self._slot(key)
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            found, paused, reset, left, under_way, limit = _RECORD.unpack_from(self._map, offset)
            budget = Budget(paused, reset, left, under_way, limit) if found == tag else Budget()
            result = change(budget)
            _RECORD.pack_into(
                self._map,
                offset,
                tag,
                budget.paused_until,
                budget.reset,
                budget.left,
                budget.under_way,
                budget.limit,
            )
            return result
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        self._file.close()


# --- the supervisor -------------------------------------------------------------------------


class _Workers:
    def __init__(self, count: int, folder: str, environ: Mapping[str, str], keys_file: str) -> None:
        self.count = count
        self.folder = folder
        self._environ = environ
        self._keys = {f"{ENV_PREFIX}IDEMPOTENCY_FILE": keys_file} if keys_file else {}
        self.processes: list[asyncio.subprocess.Process] = []
        self.stopping = False

    async def start(self) -> None:
        for index in range(self.count):
            env = {
                **self._environ,
                f"{ENV_PREFIX}WORKERS": str(self.count),
                f"{ENV_PREFIX}WORKER_INDEX": str(index),
                f"{ENV_PREFIX}WORKER_DIR": self.folder,
                **self._keys,
            }
            self.processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "canvas_gateway_server", env=env, preexec_fn=_prepare_worker
                )
            )

    def signal(self, number: int) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(number)

    def alive(self) -> bool:
        return all(process.returncode is None for process in self.processes)

    async def wait_all(self) -> list[int]:
        codes = []
        for process in self.processes:
            try:
                codes.append(await asyncio.wait_for(process.wait(), STOP_SECONDS))
            except TimeoutError:
                log.error("worker %d did not stop within %gs: killing it", process.pid, STOP_SECONDS)
                process.kill()
                codes.append(await process.wait())
        return codes


def _prepare_worker() -> None:
    """In a new worker, before it runs: SIGTERM it (a drain) if the supervisor dies, even by
    SIGKILL, so that no worker outlives its set and keeps the port (Linux's PR_SET_PDEATHSIG);
    and ignore SIGHUP until its `main` catches it (see `hangups`): a reload forwarded while
    Python starts would otherwise end it, and the worker has not read the tenants file yet."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class WorkerAdmin:
    """What the supervisor's admin address shows of its workers: their metrics merged, their
    readiness combined, their liveness."""

    def __init__(self, workers: _Workers) -> None:
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


async def supervise(settings: Settings, environ: Mapping[str, str], hangups: Hangups | None = None) -> int:
    """Run `worker_count(settings)` workers until SIGTERM or SIGINT; the exit status. SIGHUP is
    passed on to every worker (once after they are started if `hangups` counted any before)."""
    count = worker_count(settings)
    logs.throttle_accept_errors(asyncio.get_running_loop())
    with tempfile.TemporaryDirectory(prefix="canvas-gateway-") as folder:
        SharedBudgets.create(budgets_path(folder))
        keys_file = "" if settings.redis_url else host_results.keys_file(settings, folder)
        if keys_file:
            host_results.create(keys_file, private_folder=not settings.idempotency_file)
        workers = _Workers(count, folder, environ, keys_file)
        admin = WorkerAdmin(workers).server
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            admin_port = await admin.start(*settings.admin_host_port)
        except OSError:
            log.error("cannot listen on %s (CGW_ADMIN_ADDRESS): in use", settings.admin_address)
            return 1
        await workers.start()
        (hangups or Hangups()).take_over(loop, lambda: workers.signal(signal.SIGHUP))
        admin_address = f"{settings.admin_address.rpartition(':')[0]}:{admin_port}"  # port 0 made real
        log.info(
            "canvas-gateway supervising %d workers on %s; admin on %s",
            count,
            settings.grpc_address,
            admin_address,
            extra={"workers": count, "grpc_address": settings.grpc_address, "admin_address": admin_address},
        )
        exits = [asyncio.create_task(process.wait()) for process in workers.processes]
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, *exits], return_when=asyncio.FIRST_COMPLETED)
        failed = not stop.is_set()
        if failed:
            log.error("a worker exited unbidden: draining the others and exiting 1")
        workers.stopping = True
        workers.signal(signal.SIGTERM)
        codes = await workers.wait_all()
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
        await admin.stop()
        log.info("canvas-gateway workers stopped (exit codes %s)", codes, extra={"exit_codes": codes})
        return 1 if failed or any(codes) else 0
