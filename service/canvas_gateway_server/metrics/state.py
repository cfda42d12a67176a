"""State: batches under idempotency keys, results logged for reconciliation, and the shared store
(Redis) failing, replaced by the in-process one, or found to have lost what it kept. Reported by
`idempotency`, `dispatch` and `shared`."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from .families import Family, counter

RECONCILE_REASONS: Final = ("undelivered", "unread", "not_kept", "never_kept")
"""Why a result is logged at ERROR for reconciliation: its caller went away before it was handed
over (undelivered); it was handed to a stream that was then cut off, so its caller may not have read
it (unread); Redis did not answer when it was to be kept under its idempotency key, so it waits in
the backlog (not_kept); it was never kept, and its claim lapses into UNKNOWN (never_kept)."""


class StateMetrics:
    """What happens to the state kept across calls and gateways. This base ignores it all."""

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

    def results_kept(self, tenant: str, state: str, size: int) -> None:
        """A batch's result recorded for GetResults (`outcomes`): kept or failed, and its bytes."""

    def results_evicted(self, tenant: str) -> None:
        """A kept outcome freed before its time: the in-process store was at its capacity."""


class PrometheusState(StateMetrics):
    """Counts state into `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._idempotency = counter(
            registry,
            "canvas_gateway_idempotency_total",
            "Batches under an idempotency key, by verdict: claimed (sent now), kept (a kept result "
            "replayed), mismatch (another body under the key), busy (in flight elsewhere), lost (its "
            "gateway stopped while its call may have left: UNKNOWN), reclaimed (its gateway stopped "
            "before calling Braze: sent now), refused (Redis lost what it kept: not sent).",
            ("tenant", "verdict"),
        )
        self._reconcile = counter(
            registry,
            "canvas_gateway_reconciliation_results_total",
            "Batch results logged at ERROR for reconciliation, by reason: undelivered (the caller went "
            "away before it was handed over), unread (handed to a stream then cut off), not_kept (not "
            "kept under its idempotency key yet: Redis did not answer), never_kept (its claim lapses "
            "into UNKNOWN). Each needs someone to read its log line.",
            ("tenant", "reason"),
        )
        self._store_failures = counter(
            registry,
            "canvas_gateway_shared_store_failures_total",
            "Operations on the shared store (Redis) that failed or timed out, by store (budgets, "
            "results) and operation.",
            ("store", "op"),
        )
        self._store_fallback = Family(
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

        self._results_kept = counter(
            registry,
            "canvas_gateway_results_kept_total",
            "Batch results recorded for GetResults and FindRecipient, by state: kept, or failed (the "
            "store did not answer; the reconciliation log line stands for it).",
            ("tenant", "state"),
        )
        self._results_kept_bytes = counter(
            registry,
            "canvas_gateway_results_kept_bytes_total",
            "Bytes of the batch results recorded for GetResults (each kept once per handle: the "
            "request id, and the idempotency key when there is one).",
            ("tenant",),
        )
        self._results_evicted = counter(
            registry,
            "canvas_gateway_results_evicted_total",
            "Kept results freed before their time because the in-process store was full "
            "(CGW_IDEMPOTENCY_CAPACITY).",
            ("tenant",),
        )

    def reconciliations_at_zero(self, tenant: str) -> None:
        """A tenant's reconciliation series at 0 from the start, so increase() sees its first."""
        for reason in RECONCILE_REASONS:
            self._reconcile(tenant, reason)

    def idempotency(self, tenant: str, verdict: str) -> None:
        self._idempotency(tenant, verdict).inc()

    def reconcile(self, tenant: str, reason: str) -> None:
        self._reconcile(tenant, reason).inc()

    def store_failure(self, store: str, op: str) -> None:
        self._store_failures(store, op).inc()

    def store_fallback(self, store: str, active: bool) -> None:
        self._store_fallback(store).set(1 if active else 0)

    def results_kept(self, tenant: str, state: str, size: int) -> None:
        self._results_kept(tenant, state).inc()
        if state == "kept":
            self._results_kept_bytes(tenant).inc(size)

    def results_evicted(self, tenant: str) -> None:
        self._results_evicted(tenant).inc()

    def store_lost(self, active: bool) -> None:
        self._store_lost.set(1 if active else 0)
        if active:
            self._store_lost_total.inc()
