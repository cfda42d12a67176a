"""The admin HTTP listener, apart from gRPC: /metrics, /healthz and /readyz.

- `/metrics`: the Prometheus registry, in the text format or in OpenMetrics when the
  scraper's Accept header asks for it.
- `/healthz`: liveness. Answering at all proves the event loop runs.
- `/readyz`: readiness. 200 `ready`, or 503 with a one-line reason (no tenants, upstream
  session closed, draining), so a balancer stops routing here before the gateway stops.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class AdminServer:
    """Serves the admin endpoints on one address. `readiness()` is None when ready, else why not."""

    def __init__(self, registry: CollectorRegistry, readiness: Callable[[], str | None]) -> None:
        self._registry = registry
        self._readiness = readiness
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0). Raises OSError when it cannot."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        bound: int = self._runner.addresses[0][1]
        return bound

    async def start_unix(self, path: str) -> None:
        """Listen on a Unix socket: a worker's admin, which only its supervisor reads."""
        await self._runner.setup()
        await web.UnixSite(self._runner, path).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self._registry), headers={"Content-Type": content_type})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = self._readiness()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")
