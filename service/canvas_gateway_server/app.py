"""The composition root: the one place that builds and wires the gateway's objects.

Startup: settings -> tenants -> metrics registry -> tracing (OTEL_*) -> pooled HTTP session -> Braze client ->
limiter -> dispatcher -> sender -> servicer -> gRPC server with the call observer, health
and reflection -> admin listener (/metrics, /healthz, /readyz).
Shutdown, in order: health NOT_SERVING and /readyz 503 at once; after
CGW_SHUTDOWN_DELAY_SECONDS (balancers stop routing here) new sends are refused with
UNAVAILABLE; streams
stop reading new recipients, finish the batches they hold and end with UNAVAILABLE saying
where to resume; in-flight RPCs get the grace period to finish, after which their remaining
batches are abandoned with honest results (UNKNOWN if a call was under way, NOT_ATTEMPTED
otherwise); the server stops (ending what is left, such as health watchers); the HTTP
session closes; the spans left are exported; the embedded fake Braze (demo only) stops; the admin
listener stops last.

Over the ~300 lines the house aims for, for a reason: what is built (`Gateway.start`, a list of
steps, one function each below it) and how it is taken apart in order (`Gateway.stop`) read side
by side. The process around them (`run`: logging, signals, the demo banner) is in `serve`, the
facts of the process (`git_commit`, `open_file_limit`) in `process`. Each step is handed the settings group it
needs (`settings.calls`, `settings.sending`...); the whole `Settings` only where a step reads
several. Demo mode is in `demo`, the stores' choice in `stores.wiring`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from . import __version__
from .admin import AdminServer, registry_exposition
from .breaker import LocalBreaker
from .demo import start_demo_braze
from .dispatch import Dispatcher
from .edge import native, reflection
from .edge.admission import StreamSlots
from .edge.observer import CallObserver
from .edge.servicer import SERVICE_NAME, CanvasGatewayServicer, add_to_server
from .egress import Egress
from .errors import ConfigError
from .idempotency import Ledger
from .limits import LocalLimiter
from .metrics import Metrics, PrometheusMetrics, watch_loop_lag
from .outcomes import Recorder
from .process import git_commit, open_file_limit
from .retry import RetryPolicy
from .retry_budget import LocalRetryBudget
from .sending import Sender, SendLimits
from .settings import Calls, Listen, Sending, Settings, Telemetry, Tenants, WorkerRole
from .stores.wiring import Stores, open_stores
from .tenants import FileTenantDirectory, TenantDirectory
from .tracing import Tracing
from .upstream import BrazeClient, open_session
from .worker_admin import admin_socket

if TYPE_CHECKING:
    from fake_braze import FakeBraze

log = logging.getLogger(__name__)

ABANDON_SECONDS = 5.0
"""After the grace period, how long abandoned RPCs get to report their results."""
KEEP_SECONDS = 5.0
"""At shutdown, how long results not yet kept under their idempotency keys (the store did not
answer) are still offered to it."""
FLUSH_SECONDS = 1.0
"""How long RPCs that have finished get to send their last response before the server stops."""


@dataclass
class Gateway:
    """A running gateway. Build it with `Gateway.start`; end it with `stop`."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    session: aiohttp.ClientSession
    tenants: TenantDirectory
    settings: Settings
    servicer: CanvasGatewayServicer
    shutting_down: asyncio.Event
    dispatcher: Dispatcher
    metrics: Metrics
    registry: CollectorRegistry
    admin: AdminServer
    admin_port: int
    fake_braze: FakeBraze | None = None  # demo mode only
    draining: bool = False
    stopping: asyncio.Task[None] | None = None
    lag_watch: asyncio.Task[None] | None = None
    stores: Stores | None = None
    worker: WorkerRole | None = None
    egress: Egress = field(default_factory=Egress)
    tracing: Tracing = field(default_factory=Tracing)

    def secrets(self) -> frozenset[str]:
        """What logs must never show: the tenants' Braze keys and proxy credentials, the gateway's."""
        return self.tenants.secrets() | self.egress.secrets()

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        worker: WorkerRole | None = None,
        tenants: TenantDirectory | None = None,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.time,
        tracing: Tracing | None = None,
    ) -> Gateway:
        """`worker` is the role the supervisor gave this process (None: not a worker). `tracing`:
        as the OTEL_* variables in `environ` ask, unless given (tests hand one of their own). `clock`
        (epoch seconds) is what Braze's budgets and pauses are judged by: tests stand it still with
        the fake Braze's, so no window turns during them."""
        fake: FakeBraze | None = None
        if tenants is None:
            fake, tenants = await _tenant_directory(settings.tenants, environ)
        registry = CollectorRegistry()
        metrics = _metrics(settings.telemetry, registry, environ, clock)
        metrics.tenants_loaded(tenants.tenant_ids())
        if tracing is None:
            tracing = Tracing.from_env(environ, None if worker is None else worker.index)
        stores = open_stores(settings, worker, metrics)
        upstream = settings.upstream
        egress = Egress.from_settings(upstream.proxy, upstream.no_proxy, environ)
        session = open_session(upstream.pool_size, ca_file=upstream.ca_file)
        dispatcher = _dispatcher(settings, worker, session, egress, stores, metrics, clock, tracing)
        sender = _sender(settings.sending, dispatcher, metrics)
        shutting_down = asyncio.Event()
        servicer = _servicer(settings.calls, settings.sending, tenants, sender, shutting_down, metrics)
        server, health_servicer = _grpc_server(settings, worker, servicer, metrics, tracing)
        gateway = cls(
            server=server,
            port=0,
            health=health_servicer,
            session=session,
            tenants=tenants,
            settings=settings,
            servicer=servicer,
            shutting_down=shutting_down,
            dispatcher=dispatcher,
            metrics=metrics,
            registry=registry,
            admin=AdminServer(registry_exposition(registry), lambda: _now(gateway.readiness())),
            admin_port=0,
            fake_braze=fake,
            stores=stores,
            worker=worker,
            egress=egress,
            tracing=tracing,
        )
        metrics.watch_readiness(lambda: gateway.readiness() is None)
        await gateway._listen()
        await gateway._serve(stores)
        return gateway

    async def _listen(self) -> None:
        """Bind the gRPC port, then the admin port; on failure let go of all that start made."""
        listen = self.settings.listen
        try:
            self.port = _listen(self.server, listen)
            self.admin_port = await _listen_admin(self.admin, listen, self.worker)
        except (ConfigError, RuntimeError) as exc:  # grpcio raises RuntimeError for a failed bind
            await self.server.stop(None)  # releases a gRPC port bound before the admin port failed
            await self.session.close()
            self.tracing.shutdown()  # nothing was traced yet: nothing to wait for
            if self.stores is not None:
                await self.stores.stop()
            if self.fake_braze is not None:
                await self.fake_braze.stop()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"cannot listen on {listen.grpc_address}: the address is in use or not host:port"
            ) from None

    async def _serve(self, stores: Stores) -> None:
        """Start serving on the bound ports, say so to health checks and in the log."""
        await self.server.start()
        await stores.start(self.metrics)
        if self.settings.telemetry.metrics_enabled:
            self.lag_watch = asyncio.create_task(watch_loop_lag(self.metrics))
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        listen = self.settings.listen
        scheme = "TLS" if listen.tls_cert_file else "plaintext"
        if self.worker is not None:
            log.info(
                "canvas-gateway worker %d of %d listening on %s (%s)",
                self.worker.index,
                self.settings.workers.count,
                listen.grpc_address,
                scheme,
            )
        else:
            log.info(
                "canvas-gateway listening on %s (port %d, %s); admin on port %d",
                listen.grpc_address,
                self.port,
                scheme,
                self.admin_port,
            )

    def readiness(self) -> str | None:
        """None when the gateway should get traffic, else a one-line reason why not."""
        if self.draining:
            return "draining: the gateway is shutting down"
        if self.session.closed:
            return "the HTTP session to Braze is closed"
        if not self.tenants.tenant_ids():
            return "no tenants loaded"
        return None

    async def stop(self, grace: float | None = None) -> None:
        """Ordered shutdown; in-flight RPCs get `grace` seconds (default from settings).

        A second call waits for the first to finish (a second grpc stop can crash grpcio)."""
        if self.stopping is None:
            self.stopping = asyncio.create_task(self._stop(grace))
        await asyncio.shield(self.stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.shutdown.grace_seconds if grace is None else grace
        # Not ready, on both channels at once; requests are still served while balancers notice.
        self.draining = True
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.shutdown.delay_seconds)
        # From here new Send/SendStream calls get UNAVAILABLE, and open streams stop reading,
        # finish the batches they hold and end UNAVAILABLE with where to resume.
        self.shutting_down.set()
        if not await self._drained(grace):
            # Past the grace period: batches still waiting or calling Braze end now, each with a
            # result that says whether its call may have reached Braze, and the RPCs finish.
            log.warning("grace period over: abandoning the batches still in flight")
            self.dispatcher.abandon()
            if not await self._drained(ABANDON_SECONDS):
                log.error("requests still running after abandoning their batches: cancelling them")
        # One stop (a second call can crash grpcio), once our RPCs are done; the short grace lets
        # their last responses go out and ends the rest, such as health watchers.
        await self.server.stop(FLUSH_SECONDS)
        await self.dispatcher.ledger.settled(KEEP_SECONDS)
        await self.dispatcher.recorder.flush()
        if self.stores is not None:
            await self.stores.stop()
        await self.session.close()
        if self.tracing.provider is not None:  # the spans left, exported (OTEL_BSP_EXPORT_TIMEOUT)
            await asyncio.to_thread(self.tracing.shutdown)
        if self.fake_braze is not None:
            await self.fake_braze.stop()
        await self.admin.stop()
        if self.lag_watch is not None:
            self.lag_watch.cancel()
        log.info("canvas-gateway stopped")

    async def _drained(self, seconds: float) -> bool:
        """Wait up to `seconds` for our own RPCs to finish; True when they have."""
        try:
            await asyncio.wait_for(self.servicer.in_flight.idle(), seconds)
        except TimeoutError:
            return False
        return True

    def reload_tenants(self) -> None:
        """SIGHUP: reread the tenants file; on error keep the current tenants."""
        try:
            if not self.tenants.reload():
                log.info("tenants are not file-backed; nothing to reload")
                return
        except ConfigError as exc:
            self.metrics.reload(ok=False)
            log.error("tenants reload failed, keeping the previous tenants: %s", exc)
        else:
            self.metrics.reload(ok=True)
            self.metrics.tenants_loaded(self.tenants.tenant_ids())
            log.info("tenants reloaded: %d tenants", len(self.tenants.tenant_ids()))


async def _tenant_directory(
    tenants: Tenants, environ: Mapping[str, str]
) -> tuple[FakeBraze | None, TenantDirectory]:
    """The tenants file's directory, or in demo mode the embedded fake Braze and its one tenant."""
    if tenants.demo:
        return await start_demo_braze(tenants.demo_braze_port)
    return None, FileTenantDirectory(Path(tenants.file), environ)


def _metrics(
    telemetry: Telemetry, registry: CollectorRegistry, environ: Mapping[str, str], clock: Callable[[], float]
) -> Metrics:
    if not telemetry.metrics_enabled:
        return Metrics()
    return PrometheusMetrics(registry, version=__version__, git_commit=git_commit(environ), clock=clock)


def _dispatcher(
    settings: Settings,
    worker: WorkerRole | None,
    session: aiohttp.ClientSession,
    egress: Egress,
    stores: Stores,
    metrics: Metrics,
    clock: Callable[[], float],
    tracing: Tracing,
) -> Dispatcher:
    """The path of a batch: the Braze client, the limiter, retries, the breaker and the ledger."""
    upstream, retry = settings.upstream, settings.retry
    client = BrazeClient(
        session,
        aiohttp.ClientTimeout(total=upstream.timeout_seconds, connect=upstream.connect_timeout_seconds),
        egress,
        tracing.tracer,
    )
    # Concurrency per process (a worker's share of it); budgets in the stores.
    workers = settings.workers.count if worker is not None else 1
    limiter = LocalLimiter(settings.sending.tenant_concurrency, stores.budgets, clock, workers)
    return Dispatcher(
        client,
        limiter,
        RetryPolicy(
            max_attempts=retry.max_attempts,
            base_delay=retry.base_delay_seconds,
            max_wait=retry.max_wait_seconds,
            min_time_left=retry.min_call_seconds,
        ),
        Ledger(stores.results, metrics, lease=settings.state.idempotency_lease_seconds),
        metrics,
        breaker=LocalBreaker(retry.breaker_failures, retry.breaker_cooldown_seconds, metrics.breaker_state)
        if retry.breaker_failures
        else None,
        budget=LocalRetryBudget(retry.budget_ratio, retry.budget_minimum),
        clock=clock,
        tracer=tracing.tracer,
        recorder=Recorder(
            stores.results if settings.state.results_kept else None,
            metrics,
            settings.state.idempotency_ttl_seconds,
        ),
    )


def _sender(sending: Sending, dispatcher: Dispatcher, metrics: Metrics) -> Sender:
    limits = SendLimits(
        unary_max_recipients=sending.unary_max_recipients,
        request_concurrency=sending.request_concurrency,
        result_queue_size=sending.result_queue_size,
    )
    return Sender(dispatcher, limits, metrics)


def _servicer(
    calls: Calls,
    sending: Sending,
    tenants: TenantDirectory,
    sender: Sender,
    shutting_down: asyncio.Event,
    metrics: Metrics,
) -> CanvasGatewayServicer:
    return CanvasGatewayServicer(
        tenants,
        sender,
        shutting_down,
        metrics,
        header_timeout_seconds=calls.stream_header_timeout_seconds,
        deadline_margin_seconds=sending.deadline_margin_seconds,
        reconcile_tail=sending.reconcile_tail_results,
        idle_timeout_seconds=calls.stream_idle_timeout_seconds,
        streams=StreamSlots(calls.max_streams, calls.max_streams_per_tenant),
        native=native.load() if calls.native_recipients else None,
    )


def _grpc_server(
    settings: Settings,
    worker: WorkerRole | None,
    servicer: CanvasGatewayServicer,
    metrics: Metrics,
    tracing: Tracing,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The gRPC server with the call observer, the service, health and reflection; not bound yet."""
    observer = CallObserver(
        metrics, SERVICE_NAME, settings.calls.request_message_timeout_seconds, tracing.tracer
    )
    server = grpc.aio.server(
        interceptors=[observer],
        options=settings.grpc.options(
            connections=settings.connection_cap(open_file_limit()), reuse_port=worker is not None
        ),
    )
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    return server, health_servicer


def _listen(server: grpc.aio.Server, listen: Listen) -> int:
    """Bind the gRPC port: TLS when a certificate is configured, else plaintext."""
    if not listen.tls_cert_file:
        return server.add_insecure_port(listen.grpc_address)
    try:
        key = Path(listen.tls_key_file).read_bytes()
        chain = Path(listen.tls_cert_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate or key: {exc.strerror}") from None
    if b"-----BEGIN" not in chain or b"PRIVATE KEY-----" not in key:
        raise ConfigError("CGW_TLS_CERT_FILE and CGW_TLS_KEY_FILE must hold a PEM certificate chain and key")
    return server.add_secure_port(listen.grpc_address, grpc.ssl_server_credentials([(key, chain)]))


async def _now(value: str | None) -> str | None:
    return value


async def _listen_admin(admin: AdminServer, listen: Listen, worker: WorkerRole | None) -> int:
    if worker is not None:  # the supervisor serves the admin address and reads this socket
        await admin.start_unix(admin_socket(worker.folder, worker.index))
        return 0
    try:
        return await admin.start(*listen.admin_host_port)
    except OSError:
        raise ConfigError(
            f"cannot listen on {listen.admin_address} (CGW_ADMIN_ADDRESS): the address is in use "
            "or not this host's"
        ) from None
