"""The protobuf edge: requests become Braze JSON (plain dicts), results become messages.

The dicts produced here are exactly the JSON Braze receives, so validation and batching never
see protobuf; past this module the core works on them and on the dataclasses of `model`.

Numbers: google.protobuf.Struct stores every number as a double; an integral value is
turned back into an int so that a caller's `12` reaches Braze as `12`, not `12.0`.
A NaN or infinity cannot be written as JSON, and at a magnitude of 2^53 or more a double
cannot tell a caller's integer from its rounded neighbours (1234567890123456789 arrives as
1234567890123456768); all become NOT_JSON, which the encoder refuses, and the request is
rejected naming the field: such numbers must travel as strings.

A request's raw bytes become its message here too (`decode`), for both servicers of the edge.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Final, TypeVar

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2

from .. import logs
from ..braze import CONTEXT_NAMES
from ..errors import InvalidRequest
from ..model import BatchResult, Outcome, Rule, Summary, Violation
from ..rate_budget import BULK, TRANSACTIONAL

_EXACT_INT_LIMIT: Final = 2**53
Context = grpc.aio.ServicerContext[object, object]
M = TypeVar("M", bound=Message)
# Under the servicer's name, as before `decode` moved here: the name operators filter the line on.
_undecodable_log = logs.Throttled(logging.getLogger("canvas_gateway_server.edge.servicer"))


class _NotJson:
    """Stands for a number JSON cannot carry; orjson refuses to encode it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_JSON"


NOT_JSON: Final = _NotJson()


def decode(message_type: type[M], raw: bytes, field: str, context: Context) -> M:
    """`raw` as a `message_type`; a message that does not decode is the caller's error."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        name = message_type.DESCRIPTOR.name
        _undecodable_log.warning(
            "refused a message that does not decode", peer=context.peer(), message_type=name
        )
        raise InvalidRequest(
            [Violation(field, f"not a valid {name} message: it does not decode", Rule.UNDECODABLE)]
        ) from None


def value_to_py(value: struct_pb2.Value) -> Any:
    """One google.protobuf.Value as the JSON value it stands for."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return _number(value.number_value)
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [value_to_py(item) for item in value.list_value.values]
    return None


def _number(number: float) -> Any:
    if number.is_integer():
        # Past 2^53 a double has already lost digits: refuse rather than send a different number.
        return int(number) if -_EXACT_INT_LIMIT < number < _EXACT_INT_LIMIT else NOT_JSON
    return number if math.isfinite(number) else NOT_JSON


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A google.protobuf.Struct as a JSON object.

    The hot path of every recipient's context: strings and numbers, the common values, are
    read here without a call per value (indexing the map beats .items(), which goes through
    the Mapping ABC)."""
    fields = struct.fields
    out: dict[str, Any] = {}
    for key in fields:
        value = fields[key]
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            out[key] = value.string_value
        elif kind == "number_value":
            out[key] = _number(value.number_value)
        else:
            out[key] = value_to_py(value)
    return out


def _add_contexts(message: pb.CanvasTrigger | pb.Recipient, out: dict[str, Any]) -> None:
    """Copy `context` and its legacy name, where set, at the top level or in a recipient."""
    for name in CONTEXT_NAMES:
        if message.HasField(name):
            out[name] = struct_to_dict(getattr(message, name))


def trigger_head(trigger: pb.CanvasTrigger) -> dict[str, Any]:
    """The top-level Braze body fields the caller set, without `recipients`."""
    body: dict[str, Any] = {"canvas_id": trigger.canvas_id}
    _add_contexts(trigger, body)
    if trigger.HasField("broadcast"):
        body["broadcast"] = trigger.broadcast
    if trigger.HasField("audience"):
        body["audience"] = audience_to_dict(trigger.audience)
    return body


def audience_to_dict(node: pb.Audience) -> dict[str, Any]:
    """A Connected Audience node in Braze's JSON shape (AND / OR keep Braze's names)."""
    out: dict[str, Any] = {}
    if node.all_of:
        out["AND"] = [audience_to_dict(child) for child in node.all_of]
    if node.any_of:
        out["OR"] = [audience_to_dict(child) for child in node.any_of]
    if node.HasField("custom_attribute"):
        attr = node.custom_attribute
        fields: dict[str, Any] = {
            "custom_attribute_name": attr.custom_attribute_name,
            "comparison": attr.comparison,
        }
        if attr.HasField("value"):
            fields["value"] = value_to_py(attr.value)
        out["custom_attribute"] = fields
    for name in ("push_subscription_status", "email_subscription_status", "last_used_app"):
        if node.HasField(name):
            status = getattr(node, name)
            out[name] = {"comparison": status.comparison, "value": status.value}
    return out


def recipient_to_dict(recipient: pb.Recipient) -> dict[str, Any]:
    """One recipient in Braze's JSON shape, with only the fields the caller set.

    Run once per recipient, so it asks for the fields that are set in one call (ListFields)
    rather than testing each of them."""
    out: dict[str, Any] = {}
    for field, value in recipient.ListFields():
        name = field.name
        if name in _STRUCT_FIELDS:
            out[name] = struct_to_dict(value)
        elif name == "user_alias":
            out[name] = {"alias_name": value.alias_name, "alias_label": value.alias_label}
        elif name == "prioritization":
            out[name] = list(value)
        else:  # external_user_id, email, send_to_existing_only: as they are
            out[name] = value
    return out


_STRUCT_FIELDS: Final = frozenset({"context", "canvas_entry_properties", "attributes"})


def _json_to_value(item: Any) -> struct_pb2.Value:
    return json_format.ParseDict(item, struct_pb2.Value())


def violation_to_proto(violation: Violation) -> error_details_pb2.BadRequest.FieldViolation:
    return error_details_pb2.BadRequest.FieldViolation(
        field=violation.field, description=violation.description
    )


def result_to_proto(result: BatchResult) -> pb.BatchResult:
    """A core BatchResult as the wire message: Braze's answer, when there was one, in `braze`."""
    return pb.BatchResult(
        batch_index=result.batch_index,
        positions=result.positions,
        outcome=result.outcome.value,  # type: ignore[arg-type]  # same numbers as pb.Outcome
        code=int(result.code),  # model.Code holds google.rpc.Code's numbers
        status_message=result.status_message,
        retryable=result.retryable,
        attempts=result.attempts,
        violations=[violation_to_proto(v) for v in result.violations],
        rate_limit_reset=timestamp_pb2.Timestamp(seconds=result.rate_limit_reset)
        if result.rate_limit_reset
        else None,
        braze=pb.BrazeReply(
            http_status=result.http_status,
            dispatch_id=result.dispatch_id,
            message=result.message,
            notice=result.notice,
            errors=[_json_to_value(item) for item in result.errors],
        )
        if result.http_status
        else None,
        details=_details(result),
        replayed=result.replayed,
    )


QUOTA_DESCRIPTIONS: Final = {
    "recipients": "the tenant's Braze budget for calls with recipients (250,000 an hour by default) is spent",
    "broadcast": "the tenant's Braze budget for broadcast and audience calls (per minute) is spent",
}


def _details(result: BatchResult) -> list[any_pb2.Any]:
    """A result's google.rpc error details: when to retry, and which budget is spent."""
    details: list[any_pb2.Any] = []
    if result.retry_at:
        delay = max(0.0, result.retry_at - time.time())
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=math.ceil(delay)))
        details.append(_packed(retry))
    if result.quota:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"braze:{result.quota}", description=QUOTA_DESCRIPTIONS[result.quota]
        )
        details.append(_packed(error_details_pb2.QuotaFailure(violations=[violation])))
    return details


def _packed(detail: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def summary_to_proto(summary: Summary, request_id: str = "") -> pb.SendSummary:
    counts = summary.by_outcome
    return pb.SendSummary(
        request_id=request_id,
        recipients=summary.recipients,
        batches=summary.batches,
        recipients_sent=counts[Outcome.SENT],
        recipients_rejected=counts[Outcome.REJECTED],
        recipients_unknown=counts[Outcome.UNKNOWN],
        recipients_not_attempted=counts[Outcome.NOT_ATTEMPTED],
        recipients_canvas_inactive=counts[Outcome.CANVAS_INACTIVE],
    )


_LANES: Final[dict[int, str]] = {int(pb.PRIORITY_TRANSACTIONAL): TRANSACTIONAL, int(pb.PRIORITY_BULK): BULK}


def lane(priority: int) -> str:
    """`SendOptions.priority` as a budget lane; "" for UNSPECIFIED. A value this gateway does not
    know (a newer client's) is refused, not taken for another lane."""
    if priority == pb.PRIORITY_UNSPECIFIED:
        return ""
    if priority not in _LANES:
        raise InvalidRequest(
            [
                Violation(
                    "options.priority",
                    f"unknown priority {priority}: one of PRIORITY_UNSPECIFIED, "
                    "PRIORITY_TRANSACTIONAL, PRIORITY_BULK",
                    Rule.PRIORITY,
                )
            ]
        )
    return _LANES[priority]
