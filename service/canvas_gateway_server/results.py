"""The one place where what happened to a batch becomes an outcome and a status code.

CONTRACT.md sections 4 and 6: 2xx is SENT, or CANVAS_INACTIVE when Braze adds a `notice`
(accepted, nothing sent); 3xx, 400/401/403/404/413 and 429 are REJECTED (nothing sent);
5xx, timeouts and connections lost after writing are UNKNOWN (may have been sent, never
auto-retried); a connection that could not be opened is NOT_ATTEMPTED.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from .model import Batch, BatchResult, Code, Outcome, Violation
from .reply import Delivery, Reply

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


def _result(batch: Batch, outcome: Outcome, code: Code, text: str, **details: Any) -> BatchResult:
    return BatchResult(batch.index, batch.positions, outcome, code, status_message=text, **details)


def from_reply(batch: Batch, reply: Reply, attempts: int) -> BatchResult:
    """The result of a batch whose last call ended with `reply`."""
    common: dict[str, Any] = {"attempts": attempts, "http_status": reply.status}
    if reply.delivery is Delivery.NOT_SENT:
        text = f"could not connect to Braze ({reply.failure}); nothing was sent"
        return _result(batch, Outcome.NOT_ATTEMPTED, Code.UNAVAILABLE, text, retryable=True, **common)
    if reply.delivery is Delivery.UNKNOWN:
        text = f"outcome unknown: the call failed after it was sent ({reply.failure})"
        return _result(batch, Outcome.UNKNOWN, Code.UNKNOWN, text, **common)
    body = reply.body or {}
    errors = body.get("errors")
    common["message"] = str(body.get("message", ""))
    common["errors"] = tuple(errors) if isinstance(errors, list) else ()
    status = reply.status
    if 200 <= status < 300:
        common["dispatch_id"] = str(body.get("dispatch_id", ""))
        notice = str(body.get("notice", ""))
        if notice:
            text = "Braze accepted the call, but the Canvas is paused or archived: nothing was sent"
            return _result(
                batch, Outcome.CANVAS_INACTIVE, Code.FAILED_PRECONDITION, text, notice=notice, **common
            )
        return _result(batch, Outcome.SENT, Code.OK, "accepted", **common)
    if 300 <= status < 400:
        # Braze's API does not redirect: a redirect comes from a wrong host or scheme, and the
        # request was not processed where it went (it is not followed).
        text = (
            f"Braze's URL answered {status} (a redirect): the tenant's braze_rest_url is wrong, "
            "use the instance's REST base URL such as https://rest.iad-01.braze.com; nothing was sent"
        )
        return _result(batch, Outcome.REJECTED, Code.INTERNAL, text, **common)
    if status == 429:
        return _rate_limited(batch, "Braze rate limit reached", reply.rate.reset or 0, **common)
    if 400 <= status < 500:
        code, text = _REJECTED.get(status, (Code.FAILED_PRECONDITION, f"Braze answered {status}"))
        return _result(batch, Outcome.REJECTED, code, f"{text}; nothing was sent", **common)
    if not reply.body and reply.content_type and "json" not in reply.content_type:
        common["message"] = f"non-JSON response ({reply.content_type.split(';')[0]})"
    return _result(
        batch, Outcome.UNKNOWN, Code.UNKNOWN, f"outcome unknown: Braze answered {status}", **common
    )


def rate_limited_locally(batch: Batch, attempts: int, reset: int) -> BatchResult:
    """The tenant's Braze budget is spent until `reset`, further away than we may wait."""
    return _rate_limited(
        batch, "the tenant's Braze rate limit is spent until its reset", reset, attempts=attempts
    )


def _rate_limited(batch: Batch, why: str, reset: int, **details: Any) -> BatchResult:
    text = f"{why}; nothing was sent"
    code = Code.RESOURCE_EXHAUSTED
    quota = "broadcast" if batch.broadcast else "recipients"
    return _result(
        batch,
        Outcome.REJECTED,
        code,
        text,
        retryable=True,
        rate_limit_reset=reset,
        retry_at=float(reset),
        quota=quota,
        **details,
    )


def circuit_open(batch: Batch, attempts: int, host: str, until: float) -> BatchResult:
    """The circuit breaker for the tenant's Braze instance is open: no call is made."""
    text = (
        f"Braze at {host} keeps failing: calls to it are paused (circuit breaker open) "
        f"until {time.strftime('%H:%M:%S', time.gmtime(until))} UTC; nothing was sent"
    )
    return _result(
        batch,
        Outcome.NOT_ATTEMPTED,
        Code.UNAVAILABLE,
        text,
        retryable=True,
        attempts=attempts,
        retry_at=until,
    )


def deadline_cut(batch: Batch, attempts: int) -> BatchResult:
    """Too little of the caller's deadline was left to call Braze."""
    text = "the caller's deadline left too little time to call Braze; nothing was sent"
    return _result(
        batch, Outcome.NOT_ATTEMPTED, Code.DEADLINE_EXCEEDED, text, retryable=True, attempts=attempts
    )


def store_unavailable(batch: Batch, attempts: int, why: str) -> BatchResult:
    """A shared store the deployment relies on (budgets, kept results) did not answer."""
    text = f"{why}; nothing was sent"
    return _result(batch, Outcome.NOT_ATTEMPTED, Code.UNAVAILABLE, text, retryable=True, attempts=attempts)


def key_reused(batch: Batch, earlier: str) -> BatchResult:
    """The idempotency key already holds another body for this batch; `earlier` says what became
    of that one (it may have been sent: "nothing was sent" would not be the whole truth)."""
    text = (
        f"batch {batch.index} differs from the batch kept under this idempotency key (other "
        f"recipients, order or context): {earlier}; this call sent nothing for batch {batch.index}; "
        "use a new key for a new request"
    )
    return _result(batch, Outcome.REJECTED, Code.FAILED_PRECONDITION, text)


def keys_refused(batch: Batch, why: str) -> BatchResult:
    """The key store lost what it kept: keys are refused until an operator acknowledges it."""
    return _result(batch, Outcome.NOT_ATTEMPTED, Code.FAILED_PRECONDITION, f"{why}; nothing was sent")


def key_busy(batch: Batch, retry_at: float) -> BatchResult:
    """Another call is sending this batch under the same idempotency key."""
    text = f"batch {batch.index} is being sent by another call with this idempotency key; nothing was sent"
    return _result(batch, Outcome.NOT_ATTEMPTED, Code.ABORTED, text, retryable=True, retry_at=retry_at)


def failed_inside_gateway(batch: Batch, attempts: int) -> BatchResult:
    """A gateway bug interrupted the batch; if a call had started, it may have been sent."""
    if attempts == 0:
        text = "internal error before sending; nothing was sent"
        return _result(batch, Outcome.NOT_ATTEMPTED, Code.INTERNAL, text, retryable=True)
    text = "internal error while sending: outcome unknown"
    return _result(batch, Outcome.UNKNOWN, Code.INTERNAL, text, attempts=attempts)


def abandoned(batch: Batch, attempts: int, sent: bool) -> BatchResult:
    """Shutdown outlasted its grace period while this batch was waiting or calling Braze."""
    if sent:
        text = "outcome unknown: the gateway shut down while calling Braze"
        return _result(batch, Outcome.UNKNOWN, Code.UNKNOWN, text, attempts=attempts)
    text = "the gateway shut down before this batch was sent; nothing was sent"
    return _result(batch, Outcome.NOT_ATTEMPTED, Code.UNAVAILABLE, text, retryable=True, attempts=attempts)


def not_attempted(batch: Batch, reason: str, code: Code = Code.OK) -> BatchResult:
    """A planned batch that was not sent: validate_only (OK), or a stream that failed (ABORTED)."""
    return _result(batch, Outcome.NOT_ATTEMPTED, code, reason, retryable=code is not Code.OK)


def rejected_recipient(index: int, position: int, violations: tuple[Violation, ...]) -> BatchResult:
    """A stream recipient that failed validation: a result of its own, never sent."""
    text = f"{violations[0].field}: {violations[0].description}"
    batch = Batch(index=index, positions=(position,), body=b"")
    return _result(batch, Outcome.REJECTED, Code.INVALID_ARGUMENT, text, violations=violations)
