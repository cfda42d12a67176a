"""Sending: batches in flight, calls to Braze and their answers' rate-limit headers, retries, waits,
pauses, circuit breakers, the results handed back and those waiting in streams' queues. Reported by
`dispatch` and `idempotency`; breakers through `app`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Gauge, Histogram

from ..model import BatchResult, Outcome, Violation
from ..reply import Delivery, Reply
from ..tracing import exemplar
from .families import Family, counter
from .levels import Levels

if TYPE_CHECKING:
    from ..limits import Reserved
    from ..rate_budget import Ticket

BRAZE_SECONDS_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
"""Braze calls: 10 ms (a fast answer) to 30 s (the default call timeout)."""


def budget(broadcast: bool) -> str:
    """Braze keeps separate budgets for recipient calls and broadcast calls."""
    return "broadcast" if broadcast else "recipients"


class BatchMetrics:
    """What happens to batches on their way to Braze and back. This base ignores it all."""

    def batch_started(self, tenant: str) -> None: ...

    def batch_finished(self, tenant: str) -> None: ...

    def braze_call(self, tenant: str, broadcast: bool, reply: Reply, seconds: float) -> None: ...

    def retry(self, tenant: str, reason: str) -> None: ...

    def retry_denied(self, tenant: str) -> None:
        """A retry the tenant's retry budget refused: its batch ended with the last call's result."""

    def rate_limit_wait(self, tenant: str, seconds: float) -> None: ...

    def breaker_state(self, braze_host: str, state: int) -> None:
        """A Braze URL's circuit changed state (0 closed, 1 open, 2 half-open)."""

    def paused(self, tenant: str, broadcast: bool, until: float) -> None:
        """The tenant's budget is spent until `until` (epoch seconds; 0: not paused)."""

    def budget(self, reserved: Reserved, answered: Ticket | None, reply: Reply | None) -> None:
        """A call's reservations settled: what its reply tells of the pool that answered (`answered`,
        or its only pool), by workspace and pool kind (every audience's pool is `audience`)."""

    def result(self, tenant: str, result: BatchResult) -> None:
        """A batch's result handed back. One `replayed` (kept under an idempotency key by an earlier
        call) is counted apart: its outcome was counted when it was decided."""

    def buffered(self, tenant: str, delta: int) -> None:
        """Results handed to a stream's queue (+1) or taken by its caller (-1)."""


class PrometheusBatches(BatchMetrics):
    """Counts sending into `registry`; the gauges that move per batch go to `levels`, which its owner
    registers. A result's violations go to `invalid`, where the edge counts a request's."""

    def __init__(
        self,
        registry: CollectorRegistry,
        levels: Levels,
        *,
        invalid: Callable[[Iterable[Violation]], None],
    ) -> None:
        self._braze_requests = counter(
            registry,
            "canvas_gateway_braze_requests_total",
            "Calls to Braze, by HTTP status; status_class `failed` for calls without an answer "
            "(status `not_sent`: could not connect; `unknown`: failed after sending).",
            ("tenant", "status_class", "status"),
        )
        self._braze_seconds = Family(
            Histogram(
                "canvas_gateway_braze_request_duration_seconds",
                "Time of one call to Braze, to the end of its response body.",
                ("tenant",),
                buckets=BRAZE_SECONDS_BUCKETS,
                registry=registry,
            )
        )
        self._retries = counter(
            registry,
            "canvas_gateway_retries_total",
            "Calls made again: after a 429 (rate_limited), a connection that never opened "
            "(connect_failed), or a 502 for a tenant with retry_502 (bad_gateway).",
            ("tenant", "reason"),
        )
        self._retries_denied = counter(
            registry,
            "canvas_gateway_retries_denied_total",
            "Retries the tenant's retry budget refused (retries above its share of calls): the batch "
            "ended with the result of the call before.",
            ("tenant",),
        )
        self._waited = counter(
            registry,
            "canvas_gateway_rate_limit_wait_seconds_total",
            "Time batches spent waiting for a rate-limit reset or a Retry-After.",
            ("tenant",),
        )
        self._recipients = counter(
            registry,
            "canvas_gateway_recipients_total",
            "Recipients with a result, by outcome (sent, canvas_inactive, rejected, unknown, not_attempted).",
            ("tenant", "outcome"),
        )
        self._batches = counter(
            registry,
            "canvas_gateway_batches_total",
            "Batch results, by outcome and google.rpc.Code name.",
            ("tenant", "outcome", "code"),
        )
        self._replayed_recipients = counter(
            registry,
            "canvas_gateway_replayed_recipients_total",
            "Recipients of results replayed under an idempotency key (kept from an earlier call, "
            "Braze not called), by outcome; not in canvas_gateway_recipients_total.",
            ("tenant", "outcome"),
        )
        self._replayed_batches = counter(
            registry,
            "canvas_gateway_replayed_batches_total",
            "Batch results replayed under an idempotency key, by outcome and google.rpc.Code name; "
            "not in canvas_gateway_batches_total.",
            ("tenant", "outcome", "code"),
        )
        self._breaker_state = Family(
            Gauge(
                "canvas_gateway_braze_breaker_state",
                "Circuit breaker of a Braze instance: 0 closed, 1 open (its batches end "
                "NOT_ATTEMPTED), 2 half-open (one probe call).",
                ("braze_host",),
                registry=registry,
            )
        )
        self._breaker_opened = counter(
            registry,
            "canvas_gateway_braze_breaker_opened_total",
            "Times a Braze instance's circuit opened after consecutive failed calls.",
            ("braze_host",),
        )
        self._budget_spent = Family(
            Gauge(
                "canvas_gateway_budget_spent_calls",
                "Calls spent in a workspace pool's current window, as of its last reply: by the "
                "gateway (its calls started in the window) and by others (limit - remaining - gateway's).",
                ("workspace", "pool", "spender"),
                registry=registry,
            )
        )
        self._budget_remaining = Family(
            Gauge(
                "canvas_gateway_budget_remaining_calls",
                "The x-ratelimit-remaining of a workspace pool's last reply: what every service on "
                "the workspace has left in the window.",
                ("workspace", "pool"),
                registry=registry,
            )
        )
        self._budget_reserved = Family(
            Gauge(
                "canvas_gateway_budget_reserved_calls",
                "Calls of a workspace pool's window the gateway leaves: to other services (reserve) "
                "or, for bulk calls, to transactional ones.",
                ("workspace", "pool", "reserve"),
                registry=registry,
            )
        )
        self._budget_ceiling = Family(
            Gauge(
                "canvas_gateway_budget_ceiling_calls",
                "The most calls the gateway may spend in a workspace pool's window (its limit when "
                "the workspace sets no ceiling).",
                ("workspace", "pool"),
                registry=registry,
            )
        )
        self._levels = levels
        self._ours_seen: dict[tuple[str, str], tuple[int | None, int]] = {}
        """(workspace, pool kind): (reset, the most calls of the gateway's a ticket saw in it)"""
        self._invalid = invalid

    def outcomes_at_zero(self, tenant: str) -> None:
        """A tenant's outcome series at 0 from the start, so increase() sees its first outcome."""
        for outcome in Outcome:
            self._recipients(tenant, outcome.name.lower())
        self._batches(tenant, "sent", "OK")  # CanvasGatewayNoSuccessfulSends sees the first

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
        self._braze_seconds(tenant).observe(seconds, exemplar())  # the batch span's trace, if sampled
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

    def breaker_state(self, braze_host: str, state: int) -> None:
        self._breaker_state(braze_host).set(state)
        if state == 1:
            self._breaker_opened(braze_host).inc()

    def paused(self, tenant: str, broadcast: bool, until: float) -> None:
        self._levels.paused_until[(tenant, budget(broadcast))] = until

    def budget(self, reserved: Reserved, answered: Ticket | None, reply: Reply | None) -> None:
        rate = reply.rate if reply is not None else None
        if rate is None or rate.limit is None or rate.remaining is None:
            return
        ticket = answered or reserved.tickets[0]  # a reply with a limit tells of one pool
        workspace, pool = ticket.key[0], ticket.key[1].partition(":")[0]
        limit, policy = rate.limit, reserved.policy
        used = max(limit - rate.remaining, 0)
        # Replies come back in any order: the gateway's count in a window is the most any of its
        # tickets saw (it only grows within a window), not the last answered ticket's.
        seen_reset, seen = self._ours_seen.get((workspace, pool), (None, 0))
        most = max(seen, ticket.ours) if seen_reset == rate.reset else ticket.ours
        self._ours_seen[(workspace, pool)] = (rate.reset, most)
        ours = min(most, used)
        self._budget_spent(workspace, pool, "gateway").set(ours)
        self._budget_spent(workspace, pool, "others").set(used - ours)
        self._budget_remaining(workspace, pool).set(rate.remaining)
        others = policy.reserve_calls + math.ceil(policy.reserve_share * limit)
        transactional = policy.transactional_calls + math.ceil(policy.transactional_share * limit)
        self._budget_reserved(workspace, pool, "others").set(others)
        self._budget_reserved(workspace, pool, "transactional").set(transactional)
        ceiling = policy.ceiling_calls or math.floor(policy.ceiling_share * limit)
        self._budget_ceiling(workspace, pool).set(ceiling)

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
            self._invalid(result.violations)

    def buffered(self, tenant: str, delta: int) -> None:
        self._levels.buffered[tenant] += delta
