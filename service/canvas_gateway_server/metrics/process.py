"""The process: event-loop lag, tenants loaded and reloaded, readiness, and the running build.
Reported by `app` and the lag watcher (`lag`)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Final

from prometheus_client import CollectorRegistry, Gauge, Histogram, Info

from .families import counter

LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Event-loop lag: how late a timer fires. Past 100 ms every RPC and Braze call is held up."""
LOOP_LAG_INTERVAL: Final = 0.5
"""Seconds between two lag samples."""


class ProcessMetrics:
    """What happens to the gateway's process as a whole. This base ignores it all."""

    def loop_lag(self, seconds: float) -> None:
        """How late a timer on the event loop fired: time the loop spent on other work."""

    def tenants_loaded(self, tenants: Collection[str]) -> None:
        """The tenants file was read (at start or on a reload): these tenants are served."""

    def reload(self, ok: bool) -> None:
        """A reload of the tenants file succeeded, or failed (the tenants before it are kept)."""

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        """`ready()` says, when scraped, whether /readyz answers ready."""


class PrometheusProcess(ProcessMetrics):
    """Counts the process into `registry`, with the build's version and commit as an info."""

    def __init__(self, registry: CollectorRegistry, *, version: str, git_commit: str) -> None:
        self._loop_lag = Histogram(
            "canvas_gateway_event_loop_lag_seconds",
            f"How late a timer on the event loop fires, sampled every {LOOP_LAG_INTERVAL:g} s: time the "
            "loop was busy with other work, by which every RPC and Braze call was held up.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self._tenants = Gauge("canvas_gateway_tenants", "Tenants loaded.", registry=registry)
        self._reloads = counter(
            registry, "canvas_gateway_tenant_reloads_total", "Tenants-file reloads, by result.", ("result",)
        )
        self._ready = Gauge(
            "canvas_gateway_ready", "1 when /readyz answers ready, 0 otherwise.", registry=registry
        )
        Info("canvas_gateway_build", "The running build.", registry=registry).info(
            {"version": version, "git_commit": git_commit}
        )
        for result in ("success", "failure"):  # series at 0 from the start, so increase() sees the first
            self._reloads(result)

    def loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    def tenants_loaded(self, tenants: Collection[str]) -> None:
        self._tenants.set(len(tenants))

    def reload(self, ok: bool) -> None:
        self._reloads("success" if ok else "failure").inc()

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        self._ready.set_function(lambda: 1.0 if ready() else 0.0)
