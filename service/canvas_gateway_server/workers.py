"""Several worker processes on one host: one gRPC port, one admin port, budgets kept right.

A Python process runs on one core, so with `CGW_WORKERS` above 1 `__main__` runs `supervise`
instead of a gateway. The supervisor starts that many workers (each a whole gateway, started
as a fresh `python -m canvas_gateway_server`, never forked: gRPC cannot survive a fork) and:

- the workers all listen on the gRPC port with SO_REUSEPORT; the kernel gives each new
  *connection* to one of them, so a caller spreads over the workers only with several
  connections (see docs/operations.md, "Workers");
- each worker's admin listener is a Unix socket in a private folder; the supervisor serves
  the admin address: `/metrics` is every worker's exposition with a `worker` label added,
  `/readyz` is ready when every worker is, `/healthz` when every worker is alive (`worker_admin`);
- SIGTERM and SIGINT drain every worker (each drains as a single gateway does), SIGHUP
  reloads every worker's tenants (a worker starts with it ignored until its `main` catches it,
  see `hangups`); when a worker dies unbidden, the others are drained and the
  supervisor exits 1, so that the orchestrator restarts the whole set;
- per-tenant limits stay right: concurrency is divided (each worker allows its share, at
  least one), and what is known of each Braze budget (a pause until the reset, what the last
  headers said is left, the calls under way) is shared through `stores.host_budgets`, a small file
  every worker maps, so the workers together never start more calls than a budget has left;
- idempotency keys work as with one process: without Redis the supervisor makes the host's
  SQLite file (`stores.host_results`) before the workers start, and every worker keeps its claims and
  results there, so a repeat that reaches another worker finds them (and a restart too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TypeVar

from . import logs
from .hangups import Hangups
from .settings import ENV_PREFIX, Settings, WorkerRole
from .stores import host_results
from .stores.host_budgets import HostBudgets, budgets_path
from .worker_admin import WorkerAdmin

log = logging.getLogger(__name__)

STOP_SECONDS: Final = 60.0
"""How long the supervisor waits for a worker to exit after SIGTERM before it kills it; longer
than a worker's own drain (shutdown delay + grace + abandon)."""
_PR_SET_PDEATHSIG: Final = 1
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
    if settings.tenants.demo:
        return 1
    return settings.workers.count or cores()


# --- shared budgets -------------------------------------------------------------------------


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
                **WorkerRole(index, self.folder).environ(),
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


async def supervise(settings: Settings, environ: Mapping[str, str], hangups: Hangups | None = None) -> int:
    """Run `worker_count(settings)` workers until SIGTERM or SIGINT; the exit status. SIGHUP is
    passed on to every worker (once after they are started if `hangups` counted any before)."""
    count = worker_count(settings)
    logs.throttle_accept_errors(asyncio.get_running_loop())
    with tempfile.TemporaryDirectory(prefix="canvas-gateway-") as folder:
        HostBudgets.create(budgets_path(folder))
        state, listen = settings.state, settings.listen
        keys_file = "" if state.redis_url else host_results.keys_file(state, listen.grpc_port, folder)
        if keys_file:
            host_results.create(keys_file, private_folder=not state.idempotency_file)
        workers = _Workers(count, folder, environ, keys_file)
        admin = WorkerAdmin(workers).server
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            admin_port = await admin.start(*listen.admin_host_port)
        except OSError:
            log.error("cannot listen on %s (CGW_ADMIN_ADDRESS): in use", listen.admin_address)
            return 1
        await workers.start()
        (hangups or Hangups()).take_over(loop, lambda: workers.signal(signal.SIGHUP))
        admin_address = f"{listen.admin_address.rpartition(':')[0]}:{admin_port}"  # port 0 made real
        log.info(
            "canvas-gateway supervising %d workers on %s; admin on %s",
            count,
            listen.grpc_address,
            admin_address,
            extra={"workers": count, "grpc_address": listen.grpc_address, "admin_address": admin_address},
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
