"""What the gateway counts, in one module, on an injected Prometheus registry.

`Metrics` is what the rest of the gateway reports to. This base class records nothing: it
serves when metrics are off and in tests of parts that do not look at them.
`PrometheusMetrics` counts into a `CollectorRegistry` that the admin listener exposes.

Naming follows prometheus.io: base units (seconds), `_total` for counters, `canvas_gateway_`
for the gateway's own. gRPC server metrics keep the names of go-grpc-prometheus
(`grpc_server_handled_total` and friends), which existing dashboards chart (docs/observability.md: Metrics).

Label values come from bounded sets only: tenant ids (from configuration), outcomes, gRPC
code names, HTTP statuses, budgets, rule names and reasons. Canvas ids, user ids, tokens,
keys and field paths are never labels.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Final, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .model import BatchResult, Outcome, Violation
from .reply import Delivery, Reply

M = TypeVar("M", Counter, Gauge, Histogram)

BRAZE_SECONDS_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
"""Braze calls: 10 ms (a fast answer) to 30 s (the default call timeout)."""
LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Event-loop lag: how late a timer fires. Past 100 ms every RPC and Braze call is held up."""
LOOP_LAG_INTERVAL: Final = 0.5
"""Seconds between two lag samples."""
RPC_SECONDS_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
"""RPCs: a small Send takes milliseconds, a bulk stream minutes."""


AUTH_FAILURE_REASONS: Final = ("missing_token", "unknown_token")
RECONCILE_REASONS: Final = ("undelivered", "unread", "not_kept", "never_kept")
"""Why a result is logged at ERROR for reconciliation: its caller went away before it was handed
over (undelivered); it was handed to a stream that was then cut off, so its caller may not have read
it (unread); Redis did not answer when it was to be kept under its idempotency key, so it waits in
the backlog (not_kept); it was never kept, and its claim lapses into UNKNOWN (never_kept)."""


def budget(broadcast: bool) -> str:
    """Braze keeps separate budgets for recipient calls and broadcast calls."""
    return "broadcast" if broadcast else "recipients"


class Metrics:
    """Every event the gateway reports. This base ignores them all."""

    def rpc_started(self, rpc: tuple[str, str, str]) -> None:
        """`rpc` is (grpc_type, grpc_service, grpc_method)."""

    def rpc_received(self, rpc: tuple[str, str, str]) -> None: ...

    def rpc_sent(self, rpc: tuple[str, str, str]) -> None: ...

    def rpc_handled(self, rpc: tuple[str, str, str], code: str, seconds: float) -> None: ...

    def auth_failure(self, reason: str) -> None: ...

    def invalid(self, violations: Iterable[Violation]) -> None: ...

    def stream_opened(self, tenant: str) -> None: ...

    def stream_closed(self, tenant: str) -> None: ...

    def batch_started(self, tenant: str) -> None: ...

    def batch_finished(self, tenant: str) -> None: ...

    def braze_call(self, tenant: str, broadcast: bool, reply: Reply, seconds: float) -> None: ...

    def retry(self, tenant: str, reason: str) -> None: ...

    def retry_denied(self, tenant: str) -> None:
        """A retry the tenant's retry budget refused: its batch ended with the last call's result."""

    def rate_limit_wait(self, tenant: str, seconds: float) -> None: ...

    def breaker_state(self, braze_host: str, state: int) -> None:
        """A Braze URL's circuit changed state (0 closed, 1 open, 2 half-open)."""

    def loop_lag(self, seconds: float) -> None:
        """How late a timer on the event loop fired: time the loop spent on other work."""

    def paused(self, tenant: str, broadcast: bool, until: float) -> None:
        """The tenant's budget is spent until `until` (epoch seconds; 0: not paused)."""

    def result(self, tenant: str, result: BatchResult) -> None:
        """A batch's result handed back. One `replayed` (kept under an idempotency key by an earlier
        call) is counted apart: its outcome was counted when it was decided."""

    def idempotency(self, tenant: str, verdict: str) -> None:
        """A batch under an idempotency key: claimed (sent now), reclaimed (sent now: the claim's
        gateway died before calling Braze), kept (replayed), mismatch, busy, lost, refused."""

    def reconcile(self, tenant: str, reason: str) -> None:
        """A batch's result logged at ERROR for someone to reconcile: one of RECONCILE_REASONS."""

    def store_lost(self, active: bool) -> None:
        """Redis lost the keys' results (restarted empty): keys refused (True) until acknowledged."""

    def store_failure(self, store: str, op: str) -> None:
        """A shared store (Redis) did not answer in time; `store` is budgets or results."""

    def store_fallback(self, store: str, active: bool) -> None:
        """A shared store is replaced by the in-process one (fail open) while it does not answer."""

    def buffered(self, tenant: str, delta: int) -> None:
        """Results handed to a stream's queue (+1) or taken by its caller (-1)."""

    def tenants_loaded(self, tenants: Collection[str]) -> None: ...

    def reload(self, ok: bool) -> None: ...

    def watch_readiness(self, ready: Callable[[], bool]) -> None: ...


class _Family(Generic[M]):
    """A labelled metric with its children cached: `labels()` costs a lock and a tuple each time."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class _Levels(Collector):
    """Gauges that move on every batch, kept as plain numbers and read at scrape time.

    A prometheus_client gauge takes a lock per change; these change several times per batch,
    so the hot path only updates dicts (one event loop thread writes them) and `collect`
    turns them into samples. Pauses are judged against the clock at scrape time.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.streams: defaultdict[str, int] = defaultdict(int)
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.buffered: defaultdict[str, int] = defaultdict(int)
        self.remaining: dict[tuple[str, str], int] = {}
        self.limit: dict[tuple[str, str], int] = {}
        self.paused_until: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterator[Metric]:
        yield _by_tenant("canvas_gateway_streams_open", "SendStream calls open.", self.streams)
        yield _by_tenant(
            "canvas_gateway_batches_in_flight",
            "Batches waiting for a rate-limit slot or calling Braze.",
            self.in_flight,
        )
        yield _by_tenant(
            "canvas_gateway_results_buffered",
            "Results waiting in streams' queues for their callers to read them.",
            self.buffered,
        )
        yield _by_budget(
            "canvas_gateway_braze_ratelimit_remaining",
            "The last x-ratelimit-remaining Braze sent for the tenant's budget.",
            self.remaining,
        )
        yield _by_budget(
            "canvas_gateway_braze_ratelimit_limit",
            "The last x-ratelimit-limit Braze sent for the tenant's budget.",
            self.limit,
        )
        now = self._clock()
        active = {key: until for key, until in self.paused_until.items() if until > now}
        yield _by_budget(
            "canvas_gateway_tenant_paused",
            "1 while the tenant's Braze budget is spent and no call is made until its reset.",
            {key: 1 if key in active else 0 for key in self.paused_until},
        )
        yield _by_budget(
            "canvas_gateway_tenant_paused_until_timestamp_seconds",
            "When the tenant's pause ends (epoch seconds); 0 when it is not paused.",
            {key: active.get(key, 0.0) for key in self.paused_until},
        )


def _by_tenant(name: str, doc: str, values: Mapping[str, int]) -> Metric:
    """A gauge family from {tenant: value}."""
    family = GaugeMetricFamily(name, doc, labels=("tenant",))
    for tenant, number in sorted(values.items()):
        family.add_metric((tenant,), float(number))
    return family


def _by_budget(name: str, doc: str, values: Mapping[tuple[str, str], float]) -> Metric:
    """A gauge family from {(tenant, budget): value}."""
    family = GaugeMetricFamily(name, doc, labels=("tenant", "budget"))
    for key, number in sorted(values.items()):
        family.add_metric(key, float(number))
    return family


class PrometheusMetrics(Metrics):
    """Counts into `registry`; one instance per gateway, so tests get a fresh registry each."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        version: str,
        git_commit: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...]) -> _Family[Counter]:
            return _Family(Counter(name, doc, labels, registry=registry))

        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self._rpc_started = counter("grpc_server_started_total", "RPCs started on the server.", rpc)
        self._rpc_handled = counter(
            "grpc_server_handled_total", "RPCs completed on the server, by code.", (*rpc, "grpc_code")
        )
        self._rpc_received = counter(
            "grpc_server_msg_received_total", "Stream messages received from callers.", rpc
        )
        self._rpc_sent = counter("grpc_server_msg_sent_total", "Stream messages sent to callers.", rpc)
        self._rpc_seconds = _Family(
            Histogram(
                "grpc_server_handling_seconds",
                "Time from an RPC's start to its end on the server.",
                rpc,
                buckets=RPC_SECONDS_BUCKETS,
                registry=registry,
            )
        )
        self._auth_failures = counter(
            "canvas_gateway_auth_failures_total",
            "Calls refused for a missing or unknown bearer token (the caller is unknown: no tenant).",
            ("reason",),
        )
        self._violations = counter(
            "canvas_gateway_validation_failures_total",
            "Violations of Braze's request rules found, by rule.",
            ("rule",),
        )
        self._braze_requests = counter(
            "canvas_gateway_braze_requests_total",
            "Calls to Braze, by HTTP status; status_class `failed` for calls without an answer "
            "(status `not_sent`: could not connect; `unknown`: failed after sending).",
            ("tenant", "status_class", "status"),
        )
        self._braze_seconds = _Family(
            Histogram(
                "canvas_gateway_braze_request_duration_seconds",
                "Time of one call to Braze, to the end of its response body.",
                ("tenant",),
                buckets=BRAZE_SECONDS_BUCKETS,
                registry=registry,
            )
        )
        self._retries = counter(
            "canvas_gateway_retries_total",
            "Calls made again: after a 429 (rate_limited) or a connection that never opened "
            "(connect_failed).",
            ("tenant", "reason"),
        )
        self._retries_denied = counter(
            "canvas_gateway_retries_denied_total",
            "Retries the tenant's retry budget refused (retries above its share of calls): the batch "
            "ended with the result of the call before.",
            ("tenant",),
        )
        self._waited = counter(
            "canvas_gateway_rate_limit_wait_seconds_total",
            "Time batches spent waiting for a rate-limit reset or a Retry-After.",
            ("tenant",),
        )
        self._recipients = counter(
            "canvas_gateway_recipients_total",
            "Recipients with a result, by outcome (sent, canvas_inactive, rejected, unknown, not_attempted).",
            ("tenant", "outcome"),
        )
        self._batches = counter(
            "canvas_gateway_batches_total",
            "Batch results, by outcome and google.rpc.Code name.",
            ("tenant", "outcome", "code"),
        )
        self._replayed_recipients = counter(
            "canvas_gateway_replayed_recipients_total",
            "Recipients of results replayed under an idempotency key (kept from an earlier call, "
            "Braze not called), by outcome; not in canvas_gateway_recipients_total.",
            ("tenant", "outcome"),
        )
        self._replayed_batches = counter(
            "canvas_gateway_replayed_batches_total",
            "Batch results replayed under an idempotency key, by outcome and google.rpc.Code name; "
            "not in canvas_gateway_batches_total.",
            ("tenant", "outcome", "code"),
        )
        self._breaker_state = _Family(
            Gauge(
                "canvas_gateway_braze_breaker_state",
                "Circuit breaker of a Braze instance: 0 closed, 1 open (its batches end "
                "NOT_ATTEMPTED), 2 half-open (one probe call).",
                ("braze_host",),
                registry=registry,
            )
        )
        self._breaker_opened = counter(
            "canvas_gateway_braze_breaker_opened_total",
            "Times a Braze instance's circuit opened after consecutive failed calls.",
            ("braze_host",),
        )
        self._loop_lag = Histogram(
            "canvas_gateway_event_loop_lag_seconds",
            f"How late a timer on the event loop fires, sampled every {LOOP_LAG_INTERVAL:g} s: time the "
            "loop was busy with other work, by which every RPC and Braze call was held up.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self._idempotency = counter(
            "canvas_gateway_idempotency_total",
            "Batches under an idempotency key, by verdict: claimed (sent now), kept (a kept result "
            "replayed), mismatch (another body under the key), busy (in flight elsewhere), lost (its "
            "gateway stopped while its call may have left: UNKNOWN), reclaimed (its gateway stopped "
            "before calling Braze: sent now), refused (Redis lost what it kept: not sent).",
            ("tenant", "verdict"),
        )
        self._reconcile = counter(
            "canvas_gateway_reconciliation_results_total",
            "Batch results logged at ERROR for reconciliation, by reason: undelivered (the caller went "
            "away before it was handed over), unread (handed to a stream then cut off), not_kept (not "
            "kept under its idempotency key yet: Redis did not answer), never_kept (its claim lapses "
            "into UNKNOWN). Each needs someone to read its log line.",
            ("tenant", "reason"),
        )
        self._store_failures = counter(
            "canvas_gateway_shared_store_failures_total",
            "Operations on the shared store (Redis) that failed or timed out, by store (budgets, "
            "results) and operation.",
            ("store", "op"),
        )
        self._store_fallback = _Family(
            Gauge(
                "canvas_gateway_shared_store_fallback",
                "1 while a shared store does not answer and this process uses its in-process one "
                "instead (CGW_REDIS_FAILURE=open): budgets are then not shared. Alert on it.",
                ("store",),
                registry=registry,
            )
        )
        self._store_lost = Gauge(
            "canvas_gateway_idempotency_keys_refused",
            "1 while idempotency keys are refused because Redis lost the results it kept (it "
            "restarted without its data), until an operator acknowledges it. Alert on it.",
            registry=registry,
        )
        self._store_lost_total = Counter(
            "canvas_gateway_shared_store_lost_total",
            "Times this process found that Redis had lost the results it kept.",
            registry=registry,
        )
        self._tenants = Gauge("canvas_gateway_tenants", "Tenants loaded.", registry=registry)
        self._reloads = counter(
            "canvas_gateway_tenant_reloads_total", "Tenants-file reloads, by result.", ("result",)
        )
        self._ready = Gauge(
            "canvas_gateway_ready", "1 when /readyz answers ready, 0 otherwise.", registry=registry
        )
        Info("canvas_gateway_build", "The running build.", registry=registry).info(
            {"version": version, "git_commit": git_commit}
        )
        self._levels = _Levels(clock)
        registry.register(self._levels)
        for reason in AUTH_FAILURE_REASONS:  # series at 0 from the start: see tenants_loaded
            self._auth_failures(reason)
        for result in ("success", "failure"):
            self._reloads(result)

    def rpc_started(self, rpc: tuple[str, str, str]) -> None:
        self._rpc_started(*rpc).inc()

    def rpc_received(self, rpc: tuple[str, str, str]) -> None:
        self._rpc_received(*rpc).inc()

    def rpc_sent(self, rpc: tuple[str, str, str]) -> None:
        self._rpc_sent(*rpc).inc()

    def rpc_handled(self, rpc: tuple[str, str, str], code: str, seconds: float) -> None:
        self._rpc_handled(*rpc, code).inc()
        self._rpc_seconds(*rpc).observe(seconds)

    def auth_failure(self, reason: str) -> None:
        self._auth_failures(reason).inc()

    def invalid(self, violations: Iterable[Violation]) -> None:
        for violation in violations:
            self._violations(violation.rule.value).inc()

    def stream_opened(self, tenant: str) -> None:
        self._levels.streams[tenant] += 1

    def stream_closed(self, tenant: str) -> None:
        self._levels.streams[tenant] -= 1

    def batch_started(self, tenant: str) -> None:
        self._levels.in_flight[tenant] += 1

    def batch_finished(self, tenant: str) -> None:
        self._levels.in_flight[tenant] -= 1

    def braze_call(self, tenant: str, broadcast: bool, reply: Reply, seconds: float) -> None:
        if reply.delivery is Delivery.RESPONDED:
            status_class, status = f"{reply.status // 100}xx", str(reply.status)
        else:
            status_class, status = "failed", reply.delivery.value
        self._braze_requests(tenant, status_class, status).inc()
        self._braze_seconds(tenant).observe(seconds)
        rate = reply.rate
        if rate.remaining is not None:
            self._levels.remaining[(tenant, budget(broadcast))] = rate.remaining
        if rate.limit is not None:
            self._levels.limit[(tenant, budget(broadcast))] = rate.limit

    def retry(self, tenant: str, reason: str) -> None:
        self._retries(tenant, reason).inc()

    def retry_denied(self, tenant: str) -> None:
        self._retries_denied(tenant).inc()

    def rate_limit_wait(self, tenant: str, seconds: float) -> None:
        self._waited(tenant).inc(seconds)

    def loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    def breaker_state(self, braze_host: str, state: int) -> None:
        self._breaker_state(braze_host).set(state)
        if state == 1:
            self._breaker_opened(braze_host).inc()

    def paused(self, tenant: str, broadcast: bool, until: float) -> None:
        self._levels.paused_until[(tenant, budget(broadcast))] = until

    def result(self, tenant: str, result: BatchResult) -> None:
        outcome = result.outcome.name.lower()
        count = len(result.positions)
        if result.replayed:  # counted when its outcome was decided, by whichever call decided it
            self._replayed_recipients(tenant, outcome).inc(count)
            self._replayed_batches(tenant, outcome, result.code.name).inc()
            return
        self._recipients(tenant, outcome).inc(count)
        self._batches(tenant, outcome, result.code.name).inc()
        if result.violations:
            self.invalid(result.violations)

    def idempotency(self, tenant: str, verdict: str) -> None:
        self._idempotency(tenant, verdict).inc()

    def reconcile(self, tenant: str, reason: str) -> None:
        self._reconcile(tenant, reason).inc()

    def store_failure(self, store: str, op: str) -> None:
        self._store_failures(store, op).inc()

    def store_fallback(self, store: str, active: bool) -> None:
        self._store_fallback(store).set(1 if active else 0)

    def store_lost(self, active: bool) -> None:
        self._store_lost.set(1 if active else 0)
        if active:
            self._store_lost_total.inc()

    def buffered(self, tenant: str, delta: int) -> None:
        self._levels.buffered[tenant] += delta

    def tenants_loaded(self, tenants: Collection[str]) -> None:
        self._tenants.set(len(tenants))
        for tenant in tenants:  # at 0 from the start, so increase() sees a tenant's first outcome
            for outcome in Outcome:
                self._recipients(tenant, outcome.name.lower())
            self._batches(tenant, "sent", "OK")  # CanvasGatewayNoSuccessfulSends sees the first
            for reason in RECONCILE_REASONS:
                self._reconcile(tenant, reason)

    def reload(self, ok: bool) -> None:
        self._reloads("success" if ok else "failure").inc()

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        self._ready.set_function(lambda: 1.0 if ready() else 0.0)


async def watch_loop_lag(metrics: Metrics, interval: float = LOOP_LAG_INTERVAL) -> None:
    """Until cancelled, sample the event loop's lag into `metrics` every `interval` seconds."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        metrics.loop_lag(max(0.0, loop.time() - started - interval))
