"""The process around one gateway (`app.Gateway`): logging, the demo banner, signals, the wait.

`run` is what `__main__` calls for one gateway (alone, or as a worker of `workers`): it serves
until SIGTERM or SIGINT, then stops the gateway in order; SIGHUP reloads the tenants file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping

from . import logs
from .app import Gateway
from .demo import demo_banner
from .hangups import Hangups
from .settings import Settings, WorkerRole

log = logging.getLogger(__name__)


async def run(
    settings: Settings,
    worker: WorkerRole | None = None,
    environ: Mapping[str, str] = os.environ,
    hangups: Hangups | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the tenants file (once after start-up if
    `hangups` counted any during it)."""
    telemetry, index = settings.telemetry, None if worker is None else worker.index
    logs.configure(telemetry.log_level, telemetry.log_format, worker=index)
    logs.throttle_accept_errors(asyncio.get_running_loop())
    gateway = await Gateway.start(settings, worker=worker, environ=environ)
    logs.configure(telemetry.log_level, telemetry.log_format, gateway.secrets, worker=index)
    if settings.tenants.demo:
        print(demo_banner(settings.listen.grpc_address.rsplit(":", 1)[0], gateway.port), flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    (hangups or Hangups()).take_over(loop, gateway.reload_tenants)
    await stopping.wait()
    log.info(
        "shutting down: not ready for %gs, then draining for up to %gs",
        settings.shutdown.delay_seconds,
        settings.shutdown.grace_seconds,
    )
    await gateway.stop()
