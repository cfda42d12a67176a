"""The RPC edge: RPCs started and handled (the `grpc_server_*` names of go-grpc-prometheus, which
existing dashboards chart), stream messages, bearer tokens refused, request rules broken, SendStream
calls open. Reported by the interceptor (`calls`) and the servicer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Histogram

from ..model import Violation
from .families import Family, counter
from .levels import Levels

RPC_SECONDS_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
"""RPCs: a small Send takes milliseconds, a bulk stream minutes."""
AUTH_FAILURE_REASONS: Final = ("missing_token", "unknown_token")


class EdgeMetrics:
    """What happens at the gRPC edge. This base ignores it all."""

    def rpc_started(self, rpc: tuple[str, str, str]) -> None:
        """`rpc` is (grpc_type, grpc_service, grpc_method)."""

    def rpc_received(self, rpc: tuple[str, str, str]) -> None: ...

    def rpc_sent(self, rpc: tuple[str, str, str]) -> None: ...

    def rpc_handled(
        self, rpc: tuple[str, str, str], code: str, seconds: float, trace: dict[str, str] | None = None
    ) -> None:
        """`trace`: the exemplar of the RPC's span (`tracing.exemplar`), None when not sampled."""

    def auth_failure(self, reason: str) -> None:
        """A call refused for its bearer token: one of AUTH_FAILURE_REASONS."""

    def invalid(self, violations: Iterable[Violation]) -> None:
        """Request rules broken (a whole request refused, or a batch's result that carries them)."""

    def stream_opened(self, tenant: str) -> None: ...

    def stream_closed(self, tenant: str) -> None: ...


class PrometheusEdge(EdgeMetrics):
    """Counts the edge into `registry`; streams open go to `levels`, which its owner registers."""

    def __init__(self, registry: CollectorRegistry, levels: Levels) -> None:
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self._rpc_started = counter(registry, "grpc_server_started_total", "RPCs started on the server.", rpc)
        self._rpc_handled = counter(
            registry,
            "grpc_server_handled_total",
            "RPCs completed on the server, by code.",
            (*rpc, "grpc_code"),
        )
        self._rpc_received = counter(
            registry, "grpc_server_msg_received_total", "Stream messages received from callers.", rpc
        )
        self._rpc_sent = counter(
            registry, "grpc_server_msg_sent_total", "Stream messages sent to callers.", rpc
        )
        self._rpc_seconds = Family(
            Histogram(
                "grpc_server_handling_seconds",
                "Time from an RPC's start to its end on the server.",
                rpc,
                buckets=RPC_SECONDS_BUCKETS,
                registry=registry,
            )
        )
        self._auth_failures = counter(
            registry,
            "canvas_gateway_auth_failures_total",
            "Calls refused for a missing or unknown bearer token (the caller is unknown: no tenant).",
            ("reason",),
        )
        self._violations = counter(
            registry,
            "canvas_gateway_validation_failures_total",
            "Violations of Braze's request rules found, by rule.",
            ("rule",),
        )
        self._levels = levels
        for reason in AUTH_FAILURE_REASONS:  # series at 0 from the start, so increase() sees the first
            self._auth_failures(reason)

    def rpc_started(self, rpc: tuple[str, str, str]) -> None:
        self._rpc_started(*rpc).inc()

    def rpc_received(self, rpc: tuple[str, str, str]) -> None:
        self._rpc_received(*rpc).inc()

    def rpc_sent(self, rpc: tuple[str, str, str]) -> None:
        self._rpc_sent(*rpc).inc()

    def rpc_handled(
        self, rpc: tuple[str, str, str], code: str, seconds: float, trace: dict[str, str] | None = None
    ) -> None:
        self._rpc_handled(*rpc, code).inc()
        self._rpc_seconds(*rpc).observe(seconds, trace)

    def auth_failure(self, reason: str) -> None:
        self._auth_failures(reason).inc()

    def invalid(self, violations: Iterable[Violation]) -> None:
        for violation in violations:
            self._violations(violation.rule.value).inc()

    def stream_opened(self, tenant: str) -> None:
        self._levels.streams[tenant] += 1

    def stream_closed(self, tenant: str) -> None:
        self._levels.streams[tenant] -= 1
