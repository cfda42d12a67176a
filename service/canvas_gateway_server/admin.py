"""The admin HTTP listener, apart from gRPC: /metrics, /healthz and /readyz.

- `/metrics`: the Prometheus registry, in the text format or in OpenMetrics when the
  scraper's Accept header asks for it.
- `/healthz`: liveness. Answering at all proves the event loop runs (a supervisor also checks
  that every worker is alive).
- `/readyz`: readiness. 200 `ready`, or 503 with a one-line reason (no tenants, upstream
  session closed, draining), so a balancer stops routing here before the gateway stops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

Exposition = Callable[[str], Awaitable[tuple[bytes, str]]]
"""Given the scraper's Accept header: the metrics, and their content type."""
Check = Callable[[], Awaitable[str | None]]
"""None when fine, else a one-line reason why not."""


def registry_exposition(registry: CollectorRegistry) -> Exposition:
    """A registry's metrics, in the text format or in OpenMetrics when the scraper asks for it."""

    async def expose(accept: str) -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        return encode(registry), content_type

    return expose


async def _alive() -> str | None:
    return None


class AdminServer:
    """Serves the admin endpoints on one address (or a Unix socket): what `/metrics` shows, what
    `/readyz` and `/healthz` check, are given (a gateway's own, or a supervisor's of its workers)."""

    def __init__(self, metrics: Exposition, readiness: Check, liveness: Check = _alive) -> None:
        self._expose = metrics
        self._readiness = readiness
        self._liveness = liveness
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
        body, content_type = await self._expose(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, _: web.Request) -> web.Response:
        reason = await self._liveness()
        if reason is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"{reason}\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = await self._readiness()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")
