"""What the gateway counts, by concern, on one injected Prometheus registry.

`Metrics` is what the rest of the gateway reports to: the union of one small port per concern,
`edge` (RPCs, tokens, request rules, streams), `batches` (sending to Braze and the results),
`state` (idempotency keys, reconciliation, the shared store) and `process` (loop lag, tenants,
readiness, build). Its bases record nothing: it serves when metrics are off and in tests of parts
that do not look at them. `PrometheusMetrics` counts into a `CollectorRegistry` that the admin
listener exposes: each concern's Prometheus class registers its own families on that registry, and
the gauges that move on every batch are kept as plain numbers by one collector (`levels`). The lag
watcher (`lag`) samples the event loop.

Naming follows prometheus.io: base units (seconds), `_total` for counters, `canvas_gateway_`
for the gateway's own. gRPC server metrics keep the names of go-grpc-prometheus
(`grpc_server_handled_total` and friends), which existing dashboards chart (docs/observability.md: Metrics).

Label values come from bounded sets only: tenant ids (from configuration), outcomes, gRPC
code names, HTTP statuses, budgets, rule names and reasons. Canvas ids, user ids, tokens,
keys and field paths are never labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from prometheus_client import CollectorRegistry

from .batches import BRAZE_SECONDS_BUCKETS, BatchMetrics, PrometheusBatches, budget
from .edge import AUTH_FAILURE_REASONS, RPC_SECONDS_BUCKETS, EdgeMetrics, PrometheusEdge
from .lag import watch_loop_lag
from .levels import Levels
from .process import LOOP_LAG_BUCKETS, LOOP_LAG_INTERVAL, ProcessMetrics, PrometheusProcess
from .state import RECONCILE_REASONS, PrometheusState, StateMetrics

__all__ = [
    "AUTH_FAILURE_REASONS",
    "BRAZE_SECONDS_BUCKETS",
    "LOOP_LAG_BUCKETS",
    "LOOP_LAG_INTERVAL",
    "RECONCILE_REASONS",
    "RPC_SECONDS_BUCKETS",
    "BatchMetrics",
    "EdgeMetrics",
    "Metrics",
    "ProcessMetrics",
    "PrometheusMetrics",
    "StateMetrics",
    "budget",
    "watch_loop_lag",
]


class Metrics(EdgeMetrics, BatchMetrics, StateMetrics, ProcessMetrics):
    """Every event the gateway reports, by concern. This base ignores them all."""


class PrometheusMetrics(PrometheusEdge, PrometheusBatches, PrometheusState, PrometheusProcess, Metrics):
    """Counts into `registry`; one instance per gateway, so tests get a fresh registry each."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        version: str,
        git_commit: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        levels = Levels(clock)
        PrometheusEdge.__init__(self, registry, levels)
        PrometheusBatches.__init__(self, registry, levels, invalid=self.invalid)
        PrometheusState.__init__(self, registry)
        PrometheusProcess.__init__(self, registry, version=version, git_commit=git_commit)
        registry.register(levels)

    def tenants_loaded(self, tenants: Collection[str]) -> None:
        PrometheusProcess.tenants_loaded(self, tenants)
        for tenant in tenants:  # at 0 from the start, so increase() sees a tenant's first outcome
            self.outcomes_at_zero(tenant)
            self.reconciliations_at_zero(tenant)
