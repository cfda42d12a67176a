"""Core value objects. No protobuf and no I/O here: the gRPC edge converts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

MAX_RECIPIENTS_PER_CALL = 50
"""Braze's limit on `recipients` per REST call."""

MAX_BODY_BYTES = 4_000_000
"""Braze's request body limit (4 MB), read conservatively as decimal bytes."""

MAX_CONTEXT_BYTES = 50_000
"""Braze's limit on each serialized context object (50 KB), read conservatively."""


class Outcome(enum.Enum):
    """Whether Braze acted on a batch. Mirrors canvas_gateway.v1.Outcome."""

    SENT = 1
    REJECTED = 2
    UNKNOWN = 3
    NOT_ATTEMPTED = 4


class Code(enum.IntEnum):
    """The google.rpc.Code values a batch result can carry."""

    OK = 0
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14


@dataclass(frozen=True, slots=True)
class Violation:
    """One invalid field. `field` is a path in Braze's JSON names: `recipients[3].email`."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class Batch:
    """One planned REST call: its JSON body and the caller positions it carries."""

    index: int
    positions: tuple[int, ...]
    body: bytes
    broadcast: bool = False


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What happened to one batch (or to one recipient rejected by validation in a stream)."""

    batch_index: int
    positions: tuple[int, ...]
    outcome: Outcome
    code: Code
    status_message: str = ""
    retryable: bool = False
    dispatch_id: str = ""
    message: str = ""
    notice: str = ""
    errors: tuple[Any, ...] = ()
    http_status: int = 0
    attempts: int = 0
    violations: tuple[Violation, ...] = ()
    rate_limit_reset: int = 0


@dataclass(slots=True)
class Summary:
    """Running counts of a request's recipients and batches by outcome."""

    recipients: int = 0
    batches: int = 0
    by_outcome: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))

    def add(self, result: BatchResult) -> None:
        self.batches += 1
        self.recipients += len(result.positions)
        self.by_outcome[result.outcome] += len(result.positions)
