"""The one place where what happened to a batch becomes an outcome and a status code.

CONTRACT.md sections 4 and 6: 2xx is SENT; 400/401/403/404/413 and 429 are REJECTED
(nothing sent); 5xx, timeouts and connections lost after writing are UNKNOWN (may have
been sent, never auto-retried); a connection that could not be opened is NOT_ATTEMPTED.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .model import Batch, BatchResult, Code, Outcome, Violation
from .upstream import Delivery, Reply

_REJECTED: Final[Mapping[int, tuple[Code, str]]] = {
    400: (Code.INVALID_ARGUMENT, "Braze refused the request as invalid"),
    401: (Code.INTERNAL, "Braze refused the tenant's API key (wrong key or instance URL)"),
    403: (
        Code.PERMISSION_DENIED,
        "Braze refused: the key lacks canvas.trigger.send or the plan does not allow it",
    ),
    404: (Code.INTERNAL, "Braze answered 404: the tenant's REST URL is wrong"),
    413: (Code.INVALID_ARGUMENT, "Braze refused the body as too large"),
}


def from_reply(batch: Batch, reply: Reply, attempts: int) -> BatchResult:
    """The result of a batch whose last call ended with `reply`."""
    common: dict[str, Any] = {
        "batch_index": batch.index,
        "positions": batch.positions,
        "attempts": attempts,
        "http_status": reply.status,
    }
    if reply.delivery is Delivery.NOT_SENT:
        return BatchResult(
            outcome=Outcome.NOT_ATTEMPTED,
            code=Code.UNAVAILABLE,
            status_message=f"could not connect to Braze ({reply.failure}); nothing was sent",
            retryable=True,
            **common,
        )
    if reply.delivery is Delivery.UNKNOWN:
        return BatchResult(
            outcome=Outcome.UNKNOWN,
            code=Code.UNKNOWN,
            status_message=f"outcome unknown: the call failed after it was sent ({reply.failure})",
            **common,
        )
    body = reply.body or {}
    message = str(body.get("message", ""))
    errors = body.get("errors")
    common["message"] = message
    common["errors"] = tuple(errors) if isinstance(errors, list) else ()
    status = reply.status
    if 200 <= status < 300:
        notice = str(body.get("notice", ""))
        return BatchResult(
            outcome=Outcome.SENT,
            code=Code.OK,
            status_message="accepted, but the Canvas is inactive: nothing was sent" if notice else "accepted",
            dispatch_id=str(body.get("dispatch_id", "")),
            notice=notice,
            **common,
        )
    if status == 429:
        return BatchResult(
            outcome=Outcome.REJECTED,
            code=Code.RESOURCE_EXHAUSTED,
            status_message="Braze rate limit reached; nothing was sent",
            retryable=True,
            rate_limit_reset=reply.rate.reset or 0,
            **common,
        )
    if status in _REJECTED:
        code, text = _REJECTED[status]
        return BatchResult(
            outcome=Outcome.REJECTED,
            code=code,
            status_message=f"{text}; nothing was sent",
            **common,
        )
    if 400 <= status < 500:
        return BatchResult(
            outcome=Outcome.REJECTED,
            code=Code.FAILED_PRECONDITION,
            status_message=f"Braze answered {status}; nothing was sent",
            **common,
        )
    if not reply.body and reply.content_type and "json" not in reply.content_type:
        common["message"] = f"non-JSON response ({reply.content_type.split(';')[0]})"
    return BatchResult(
        outcome=Outcome.UNKNOWN,
        code=Code.UNKNOWN,
        status_message=f"outcome unknown: Braze answered {status}",
        **common,
    )


def rate_limited_locally(batch: Batch, attempts: int, reset: int) -> BatchResult:
    """The tenant's Braze budget is spent until `reset`, further away than we may wait."""
    return BatchResult(
        batch_index=batch.index,
        positions=batch.positions,
        outcome=Outcome.REJECTED,
        code=Code.RESOURCE_EXHAUSTED,
        status_message="the tenant's Braze rate limit is spent until its reset; nothing was sent",
        retryable=True,
        attempts=attempts,
        rate_limit_reset=reset,
    )


def failed_inside_gateway(batch: Batch, attempts: int) -> BatchResult:
    """A gateway bug interrupted the batch; if a call had started, it may have been sent."""
    if attempts == 0:
        return BatchResult(
            batch_index=batch.index,
            positions=batch.positions,
            outcome=Outcome.NOT_ATTEMPTED,
            code=Code.INTERNAL,
            status_message="internal error before sending; nothing was sent",
            retryable=True,
        )
    return BatchResult(
        batch_index=batch.index,
        positions=batch.positions,
        outcome=Outcome.UNKNOWN,
        code=Code.INTERNAL,
        status_message="internal error while sending: outcome unknown",
        attempts=attempts,
    )


def not_attempted(batch: Batch, reason: str, code: Code = Code.OK) -> BatchResult:
    """A planned batch that was not sent: validate_only (OK), or a stream that failed (ABORTED)."""
    return BatchResult(
        batch_index=batch.index,
        positions=batch.positions,
        outcome=Outcome.NOT_ATTEMPTED,
        code=code,
        status_message=reason,
        retryable=code is not Code.OK,
    )


def rejected_recipient(index: int, position: int, violations: tuple[Violation, ...]) -> BatchResult:
    """A stream recipient that failed validation: a result of its own, never sent."""
    return BatchResult(
        batch_index=index,
        positions=(position,),
        outcome=Outcome.REJECTED,
        code=Code.INVALID_ARGUMENT,
        status_message=f"{violations[0].field}: {violations[0].description}",
        violations=violations,
    )
