"""The admin HTTP listener, apart from gRPC: /metrics, /healthz and /readyz.

- `/metrics`: the Prometheus registry, in the text format or in OpenMetrics when the
  scraper's Accept header asks for it.
- `/healthz`: liveness. Answering at all proves the event loop runs (a supervisor also checks
  that every worker is alive).
- `/readyz`: readiness. 200 `ready`, or 503 with a one-line reason (no tenants, upstream
  session closed, draining), so a balancer stops routing here before the gateway stops.

The port is open to whoever reaches it, so what it costs is bounded (issue 17):

- It runs on a thread of its own, with its own event loop: accepting, reading and answering
  HTTP never wait in the queue of the loop that serves gRPC. What an answer shows (the
  metrics, the checks) is still computed on the loop that started the server, its *owner*, so
  the state it reads has one thread.
- Each endpoint's answers are *paced* (`_Pacer`): a request gets an answer computed after it
  arrived; requests that arrive together share one; the next one starts only after `PACING`
  times as long as the last took on the owner loop (at least `MIN_SPACING_SECONDS`). A flood
  of scrapes takes at most about 1 / (PACING + 1) of the owner loop's time, whatever its rate.
- A connection that has not sent a whole request `IDLE_SECONDS` after it opened (or after its
  last answer) is closed (slowloris), and at most `MAX_CONNECTIONS` stay open: a new one closes
  the oldest, so stalled connections cannot hold the file descriptors probes need (the port
  holds at most MAX_CONNECTIONS + BACKLOG).
- When the process is out of file descriptors, asyncio's one error record a failed accept
  (with its traceback, up to a hundred a second) becomes one warning every 10 s, with a count
  (`logs.throttle_accept_errors`, as on the gateway's own loop).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import logs

log = logging.getLogger(__name__)
T = TypeVar("T")

Exposition = Callable[[str], Awaitable[tuple[bytes, str]]]
"""Given the scraper's Accept header: the metrics, and their content type. Scrapes whose Accept
headers choose the same encoder (prometheus_client's `choose_encoder`) may share one answer."""
Check = Callable[[], Awaitable[str | None]]
"""None when fine, else a one-line reason why not."""

IDLE_SECONDS: Final = 10.0
"""How long a connection may go without sending a whole request before it is closed."""
MAX_CONNECTIONS: Final = 64
"""Admin connections open at once; one more closes the oldest."""
BACKLOG: Final = 16
"""Connections waiting to be accepted, and the most accepted at once: with MAX_CONNECTIONS, the
most descriptors the admin port holds."""
PACING: Final = 9.0
"""After an answer took t seconds on the owner loop, the next starts no sooner than PACING * t
later (at most MAX_SPACING_SECONDS): scrapes take at most about a tenth of the owner's time."""
MIN_SPACING_SECONDS: Final = 0.005
"""...and no sooner than this: a check that takes microseconds runs at most 200 times a second."""
MAX_SPACING_SECONDS: Final = 1.0


class _WithoutCreated(Collector):
    """A registry's metrics without the `*_created` samples of its counters and histograms: about
    a quarter of the exposition (39 of 164 lines for one tenant after one call), which no dashboard
    or alert reads and Prometheus would only store as series. Kept to this exposition, not turned
    off for the process (`disable_created_metrics()` is global), so nothing else there changes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric


def registry_exposition(registry: CollectorRegistry) -> Exposition:
    """A registry's metrics, in the text format or in OpenMetrics when the scraper asks for it;
    without `*_created` series."""
    exposed = CollectorRegistry()
    exposed.register(_WithoutCreated(registry))

    async def expose(accept: str) -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        return encode(exposed), content_type

    return expose


async def _alive() -> str | None:
    return None


class _Pacer:
    """Runs productions on the owner loop for requests on the admin loop, one at a time.

    Each request waits for a production that starts after it arrived (so it sees everything
    done before it asked); requests with the same key waiting at once share one production;
    a production starts `PACING` times the previous one's duration after that one ended."""

    def __init__(self, owner: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self._owner = owner
        self._clock = clock
        self._turn = asyncio.Lock()
        self._next: dict[str, asyncio.Future[Any]] = {}
        self._ready_at = 0.0

    async def get(self, key: str, produce: Callable[[], Awaitable[T]]) -> T:
        """The answer of a production of `produce` (shared by `key`) that started after this call."""
        waiting = self._next.get(key)
        if waiting is None:
            waiting = self._next[key] = asyncio.ensure_future(self._produce(key, produce))
            waiting.add_done_callback(_retrieve)
        result: T = await asyncio.shield(waiting)
        return result

    async def _produce(self, key: str, produce: Callable[[], Awaitable[T]]) -> T:
        async with self._turn:
            delay = self._ready_at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            del self._next[key]  # from here, a new request waits for the next production
            spent = [0.0]
            try:
                return await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(_timed(produce, spent), self._owner)
                )
            finally:
                spacing = min(max(PACING * spent[0], MIN_SPACING_SECONDS), MAX_SPACING_SECONDS)
                self._ready_at = self._clock() + spacing


async def _timed(produce: Callable[[], Awaitable[T]], spent: list[float]) -> T:
    """On the owner loop: `produce()`, its duration added to `spent[0]`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        return await produce()
    finally:
        spent[0] += loop.time() - start


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A production every waiter left keeps its error to itself (no 'never retrieved' noise)."""
    if not future.cancelled():
        future.exception()


class AdminServer:
    """Serves the admin endpoints on one address (or a Unix socket): what `/metrics` shows, what
    `/readyz` and `/healthz` check, are given (a gateway's own, or a supervisor's of its workers),
    and are computed on the event loop that calls `start`; the HTTP is served on a thread."""

    def __init__(
        self,
        metrics: Exposition,
        readiness: Check,
        liveness: Check = _alive,
        *,
        idle_seconds: float = IDLE_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._expose = metrics
        self._readiness = readiness
        self._liveness = liveness
        self._max_connections = max_connections
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=idle_seconds
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: asyncio.Server | None = None
        self._pacers: dict[str, _Pacer] = {}  # one per endpoint: a slow check delays no other

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0). Raises OSError when it cannot."""
        bound: int = await self._on_thread(self._listen_tcp(host, port))
        return bound

    async def start_unix(self, path: str) -> None:
        """Listen on a Unix socket: a worker's admin, which only its supervisor reads."""
        await self._on_thread(self._listen_unix(path))

    async def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(), loop))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)

    async def _on_thread(self, listening: Awaitable[T]) -> T:
        """Start the admin thread and its loop, and listen there; on failure, end the thread."""
        owner = asyncio.get_running_loop()
        loop = asyncio.new_event_loop()
        logs.throttle_accept_errors(loop, "admin port")
        thread = threading.Thread(
            target=_serve_forever, args=(loop,), name="canvas-gateway-admin", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        self._pacers = {path: _Pacer(owner, loop.time) for path in ("/metrics", "/healthz", "/readyz")}

        async def listen() -> T:
            await self._runner.setup()
            return await listening

        try:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(listen(), loop))
        except BaseException:
            await self.stop()
            raise

    async def _listen_tcp(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._connection, host, port, reuse_address=True, backlog=BACKLOG
        )
        bound: int = self._listener.sockets[0].getsockname()[1]
        return bound

    async def _listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_unix_server(self._connection, path, backlog=BACKLOG)

    def _connection(self) -> asyncio.BaseProtocol:
        """A new connection's protocol; room is made for it before it counts as connected."""
        server = self._runner.server
        assert server is not None
        asyncio.get_running_loop().call_soon(self._make_room, server)  # before its connection_made
        return server()

    def _make_room(self, server: web.Server) -> None:
        """Close the oldest connections, so that one more keeps the count at most the limit."""
        open_ = [handler for handler in server.connections if handler.transport is not None]
        for handler in open_[: max(0, len(open_) - self._max_connections + 1)]:
            handler.force_close()

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        key = choose_encoder(accept)[1]
        body, content_type = await self._pacers["/metrics"].get(key, lambda: self._expose(accept))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, _: web.Request) -> web.Response:
        reason = await self._pacers["/healthz"].get("", self._liveness)
        if reason is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"{reason}\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = await self._pacers["/readyz"].get("", self._readiness)
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")


def _serve_forever(loop: asyncio.AbstractEventLoop) -> None:
    """The admin thread: its loop until stopped, then whatever is left of it ended and closed."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
