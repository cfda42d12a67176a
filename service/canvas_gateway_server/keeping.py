"""What is kept of a batch under an idempotency key: what makes two batches the same (`digest`),
which results are kept (`kept`), how a kept result is stored (`encode`, `decode`), and what a
repeat with another body is told of it (`describe`). Pure: `idempotency.Ledger` uses it, the
stores hold only its bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Final

import orjson

from .model import Batch, BatchResult, Code, Outcome

CUT_OFF_TEXT: Final = (
    "outcome unknown: the call that sent this batch under this idempotency key was cut off (its "
    "caller went away) while Braze was being called; it is not sent again"
)


LOST_TEXT: Final = (
    "outcome unknown: an earlier call under this idempotency key was sending this batch when its "
    "gateway stopped; it is not sent again"
)


def digest(batch: Batch) -> str:
    """What a batch is: its body (canvas, context, recipients in order) as sent to Braze.

    The body is canonical JSON (`validate` sorts keys at every depth; the head's keys all sort
    before `recipients`, which `batching` appends last): map entries in any order, decoded in
    any process, give one body and one digest (tests/test_digest.py)."""
    return hashlib.blake2b(batch.body, digest_size=16).hexdigest()


def kept(result: BatchResult) -> bool:
    """Whether a result must be kept: the batch may have been sent (SENT, UNKNOWN), so sending it
    again could message someone twice. Every other result says that nothing was sent (a 429, a
    401 for a wrong key, a 400, a paused Canvas, no connection...): the claim is released, and a
    later call sends the batch, once the cause is fixed (CONTRACT.md point 31)."""
    return result.outcome in (Outcome.SENT, Outcome.UNKNOWN)


_FIELDS: Final = (
    "status_message",
    "retryable",
    "dispatch_id",
    "message",
    "notice",
    "errors",
    "http_status",
    "attempts",
)


def encode(result: BatchResult) -> bytes:
    fields: dict[str, Any] = {name: getattr(result, name) for name in _FIELDS}
    fields["outcome"], fields["code"] = result.outcome.value, int(result.code)
    fields["recipients"] = len(result.positions)
    return orjson.dumps(fields)


def decode(data: bytes, batch: Batch) -> BatchResult:
    """A kept result as this batch's (its index and positions are this call's)."""
    if not data:  # LOST: kept as UNKNOWN without a result
        return replace(lost(batch), replayed=True)
    fields = orjson.loads(data)
    outcome, code = Outcome(fields.pop("outcome")), Code(fields.pop("code"))
    fields.pop("recipients", None)
    fields["errors"] = tuple(fields["errors"])
    return BatchResult(batch.index, batch.positions, outcome, code, replayed=True, **fields)


def describe(data: bytes | None) -> str:
    """What a repeat with another body is told of the batch under its key and index."""
    if data is None:
        return "that batch is being sent by another call now"
    if not data:
        return "that batch ended UNKNOWN (its gateway stopped while calling Braze): it may have been sent"
    fields = orjson.loads(data)
    outcome = Outcome(fields["outcome"]).name
    count = fields.get("recipients")
    text = f"that batch{f' of {count} recipients' if count else ''} ended {outcome}"
    if fields.get("dispatch_id"):
        text += f" (dispatch_id {fields['dispatch_id']})"
    if outcome == "SENT":
        text += ": its recipients were sent"
    elif outcome == "UNKNOWN":
        text += ": it may have been sent"
    return text


def lost(batch: Batch, text: str = LOST_TEXT) -> BatchResult:
    return BatchResult(batch.index, batch.positions, Outcome.UNKNOWN, Code.UNKNOWN, text)
