"""What becomes of every result, for metrics and for whoever reconciles: one place.

A result is counted when it is made, delivered or not (`made`), and logged when it did not end
SENT. A result its caller will never get (`undelivered`), or may not have read (`unread`), and a
batch cancelled with its caller while Braze was being called (`cancelled_while_calling`) are
logged at ERROR or WARNING with what a reconciliation needs: tenant, batch, positions, outcome,
dispatch_id, never a secret. `dispatch` and `sending` both report here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .context import RequestContext
from .logs import Ranges
from .metrics import Metrics
from .model import Batch, BatchResult, Code, Outcome

log = logging.getLogger(__name__)


def cancelled_while_calling(context: RequestContext, batch: Batch) -> None:
    """A batch cancelled with its caller while Braze was being called: no result can reach the
    caller now, so leave a trace to reconcile."""
    log.warning(
        "batch %d was cancelled with its caller while calling Braze: outcome unknown",
        batch.index,
        extra=_fields(context.tenant.id, batch.index, batch.positions, Outcome.UNKNOWN),
    )


def made(metrics: Metrics, context: RequestContext, result: BatchResult) -> None:
    """Count a result when it is made, delivered or not, and log one that did not end SENT."""
    metrics.result(context.tenant.id, result)
    if result.outcome is Outcome.SENT or (result.outcome is Outcome.NOT_ATTEMPTED and result.code is Code.OK):
        return  # sent, or planned by validate_only
    log.warning(
        "batch %d %s: %s",
        result.batch_index,
        result.outcome.name,
        result.status_message,
        extra=_result_fields(context.tenant.id, result),
    )


def undelivered(metrics: Metrics, context: RequestContext, result: BatchResult) -> None:
    """A result its caller will never get (it stopped reading or went away): logged to reconcile."""
    tenant = context.tenant.id
    metrics.reconcile(tenant, "undelivered")
    log.error(
        "result of batch %d not delivered (the caller stopped reading or went away)",
        result.batch_index,
        extra={**_result_fields(tenant, result), "dispatch_id": result.dispatch_id or "-"},
    )


def unread(metrics: Metrics, context: RequestContext, handed: Iterable[BatchResult]) -> None:
    """Results handed to a stream that was then cut off: its caller may not have read them (gRPC
    drops what it buffered when a call is cancelled). Only the stream's last results are kept for
    this (CGW_RECONCILE_TAIL_RESULTS); the first line says from which batch on they are listed."""
    tenant, kept = context.tenant.id, list(handed)
    if not kept:
        return
    log.error(
        "stream cut off: the last %d results handed to the caller may not have been read; "
        "each is logged, earlier ones are presumed read",
        len(kept),
        extra={"tenant": tenant, "results": len(kept)},
    )
    for result in kept:
        metrics.reconcile(tenant, "unread")
        log.error(
            "result of batch %d may not have been read (the stream was cut off)",
            result.batch_index,
            extra={**_result_fields(tenant, result), "dispatch_id": result.dispatch_id or "-"},
        )


def _fields(tenant: str, index: int, positions: tuple[int, ...], outcome: Outcome) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "batch_index": index,
        "positions": Ranges.of(positions),
        "recipients": len(positions),
        "outcome": outcome.name,
    }


def _result_fields(tenant: str, result: BatchResult) -> dict[str, Any]:
    """What a log line says of a result, for reconciliation: never a secret (Braze's text is scrubbed)."""
    return {
        **_fields(tenant, result.batch_index, result.positions, result.outcome),
        "code": result.code.name,
        "http_status": result.http_status,
        "attempts": result.attempts,
        "braze_message": result.message,
    }
