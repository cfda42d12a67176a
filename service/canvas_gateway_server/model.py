"""Core value objects. No protobuf and no I/O here: the gRPC edge converts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Outcome(enum.Enum):
    """Whether Braze acted on a batch. Mirrors canvas_gateway.v1.Outcome."""

    SENT = 1
    REJECTED = 2
    UNKNOWN = 3
    NOT_ATTEMPTED = 4
    CANVAS_INACTIVE = 5
    """Braze accepted the call with a notice (Canvas paused or archived): nothing was sent."""


class Code(enum.IntEnum):
    """The google.rpc.Code values a batch result can carry."""

    OK = 0
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14


class Rule(enum.StrEnum):
    """The rule a violation breaks: a bounded name, safe as a metric label (never a path or value)."""

    CANVAS_ID_REQUIRED = "canvas_id_required"
    CONTEXT_BOTH_NAMES = "context_both_names"
    CONTEXT_TOO_LARGE = "context_too_large"
    NUMBER_NOT_EXACT = "number_not_exact"
    BODY_TOO_LARGE = "body_too_large"
    BROADCAST_WITH_RECIPIENTS = "broadcast_with_recipients"
    RECIPIENTS_REQUIRED = "recipients_required"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    IDENTIFIER_COUNT = "identifier_count"
    EXTERNAL_USER_ID_EMPTY = "external_user_id_empty"
    USER_ALIAS_INCOMPLETE = "user_alias_incomplete"
    EXISTING_ONLY_WITH_ALIAS = "existing_only_with_alias"
    ATTRIBUTES_REQUIRED = "attributes_required"
    EMAIL_FORMAT = "email_format"
    PRIORITIZATION_REQUIRED = "prioritization_required"
    PRIORITIZATION_VALUE = "prioritization_value"
    PRIORITIZATION_CONFLICT = "prioritization_conflict"
    AUDIENCE_DEPTH = "audience_depth"
    AUDIENCE_NODE = "audience_node"
    AUDIENCE_EMPTY_GROUP = "audience_empty_group"
    AUDIENCE_ATTRIBUTE_NAME = "audience_attribute_name"
    AUDIENCE_COMPARISON = "audience_comparison"
    AUDIENCE_VALUE = "audience_value"
    UNDECODABLE = "undecodable"
    STREAM_HEADER = "stream_header"
    STREAM_BROADCAST = "stream_broadcast"
    IDEMPOTENCY_KEY = "idempotency_key"
    PRIORITY = "priority"
    LOOKUP = "lookup"


@dataclass(frozen=True, slots=True)
class Violation:
    """One invalid field. `field` is a path in Braze's JSON names: `recipients[3].email`."""

    field: str
    description: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class Batch:
    """One planned REST call: its JSON body and the caller positions it carries."""

    index: int
    positions: tuple[int, ...]
    body: bytes
    broadcast: bool = False
    """The call draws on Braze's per-minute broadcast budgets, not the hourly recipient pool: a
    broadcast (no recipients), or a call with an `audience` when the tenant's `audience_budget`
    is `any_audience` (CONTRACT.md 8, point 21)."""
    audience: str = ""
    """For a call on the broadcast budgets: a digest of its `canvas_id` and `audience`, the
    unique audience whose 10-a-minute budget it also draws on (CONTRACT.md 8, point 18)."""
    lane: str = ""
    """The priority lane the request asked for (`transactional`, `bulk`); "": the tenant's choice
    (`limits.lane_of`), else the RPC's (unary Send transactional, SendStream bulk)."""


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
    retry_at: float = 0.0
    """When trying again may succeed (epoch seconds; 0: no advice): a RetryInfo on the wire."""
    quota: str = ""
    """The Braze budget that is spent (`recipients` or `broadcast`): a QuotaFailure on the wire."""
    replayed: bool = False
    """Kept from an earlier call under the same idempotency key: Braze was not called for it now."""


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
