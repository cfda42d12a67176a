"""Braze's request rules for `POST /canvas/trigger/send` (CONTRACT.md sections 2 and 3).

Pure functions, no I/O. Each check returns `None` when the input passes, or the
`(status, message)` pair Braze would answer. The first failing rule wins, so a
request is rejected with one message, as Braze does.

The fake refuses what Braze documents as an error and accepts what Braze documents as
accepted; where the docs are silent it follows the project's decisions, recorded in
CONTRACT.md section 8 (points 22 to 27), the same ones the gateway's validation follows.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from canvas_gateway_server.braze import (
    AUDIENCE_FILTERS,
    CONTEXT_NAMES,
    IDENTIFIERS,
    LAST_USED_APP_COMPARISONS,
    MAX_AUDIENCE_DEPTH,
    MAX_BODY_BYTES,
    MAX_CONTEXT_BYTES,
    MAX_RECIPIENTS_PER_CALL,
    PRIORITIZATION_VALUES,
    RECIPIENT_FIELDS,
    SUBSCRIPTION_COMPARISONS,
    SUBSCRIPTION_VALUES,
    TOP_LEVEL_FIELDS,
    VALUELESS_COMPARISONS,
    is_iso_datetime,
)

Rejection = tuple[int, str]

MAX_RECIPIENTS: Final = MAX_RECIPIENTS_PER_CALL

TOO_MANY_RECIPIENTS: Final = "The max number of external_ids and aliases per request was exceeded"

FILTER_KEYS: Final = frozenset(AUDIENCE_FILTERS)


def _bad(message: str) -> Rejection:
    return (400, message)


def _at(where: str, name: str) -> str:
    """Name a field for a message: `context` at top level, `recipients[3].context` inside."""
    return f"{where}.{name}" if where else name


def check_size(size: int) -> Rejection | None:
    """Reject a body larger than Braze's 4 MB request limit with 413."""
    if size > MAX_BODY_BYTES:
        return (413, f"Request body is too large: {size} bytes exceeds {MAX_BODY_BYTES}")
    return None


def check_content_type(content_type: str) -> Rejection | None:
    """Require `application/json` (the mime type only, parameters ignored)."""
    if content_type.lower() != "application/json":
        return _bad("Content-Type must be application/json")
    return None


def parse_json(raw: bytes) -> tuple[Any, Rejection | None]:
    """Parse the body; return `(body, None)` or `(None, rejection)`."""
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError:
        return None, _bad("Invalid JSON in request body")


def check_request(body: Any) -> Rejection | None:
    """Apply every body rule of CONTRACT.md sections 2.3 and 3 to a parsed body."""
    if not isinstance(body, dict):
        return _bad("Request body must be a JSON object")
    if "api_key" in body:
        return _bad("api_key is not accepted in the request body; use the Authorization header")
    unknown = sorted(body.keys() - TOP_LEVEL_FIELDS)
    if unknown:
        return _bad(f"Unknown field(s): {', '.join(unknown)}")
    canvas_id = body.get("canvas_id")
    if not isinstance(canvas_id, str) or not canvas_id:
        return _bad("canvas_id must be a string of the Canvas api identifier")
    broadcast = body.get("broadcast", False)
    if not isinstance(broadcast, bool):
        return _bad("broadcast must be a boolean")
    rejection = _check_contexts(body, "")
    if rejection is not None:
        return rejection
    if "recipients" in body:
        rejection = _check_recipients(body["recipients"], broadcast)
    elif not broadcast:
        rejection = _bad("Either recipients must be provided or broadcast must be true")
    if rejection is None and "audience" in body:
        rejection = check_audience(body["audience"])
    # The two context names in different objects of one request are accepted: Braze documents
    # them as the same thing (CONTRACT 8, point 24); both in one object is refused above.
    return rejection


def _check_contexts(obj: dict[str, Any], where: str) -> Rejection | None:
    if "context" in obj and "canvas_entry_properties" in obj:
        both = f"{_at(where, 'context')} and {_at(where, 'canvas_entry_properties')}"
        return _bad(f"{both} cannot both be provided")
    for name in CONTEXT_NAMES:
        if name not in obj:
            continue
        value = obj[name]
        if not isinstance(value, dict):
            return _bad(f"{_at(where, name)} must be an object")
        size = len(orjson.dumps(value))
        if size > MAX_CONTEXT_BYTES:
            return _bad(f"{_at(where, name)} is {size} bytes; the limit is {MAX_CONTEXT_BYTES}")
    return None


def _check_recipients(recipients: Any, broadcast: bool) -> Rejection | None:
    if broadcast:
        return _bad("recipients cannot be provided when broadcast is true")
    if not isinstance(recipients, list):
        return _bad("recipients must be an array of recipient objects")
    if not recipients:
        return _bad("recipients must not be empty; set broadcast to true to send to the audience")
    if len(recipients) > MAX_RECIPIENTS:
        return _bad(TOO_MANY_RECIPIENTS)
    for index, recipient in enumerate(recipients):
        rejection = check_recipient(recipient, f"recipients[{index}]")
        if rejection is not None:
            return rejection
    return None


def check_recipient(recipient: Any, where: str = "recipient") -> Rejection | None:
    """Apply the per-recipient rules (identifier, email, send_to_existing_only, contexts)."""
    if not isinstance(recipient, dict):
        return _bad(f"{where} must be an object")
    unknown = sorted(recipient.keys() - RECIPIENT_FIELDS)
    if unknown:
        return _bad(f"Unknown field(s) in {where}: {', '.join(unknown)}")
    present = [name for name in IDENTIFIERS if name in recipient]
    if len(present) != 1:
        return _bad(f"{where} must specify exactly one of external_user_id, user_alias or email")
    rejection = _check_identifier(recipient, present[0], where)
    if rejection is None:
        rejection = _check_existing_only(recipient, where)
    if rejection is None:
        rejection = _check_contexts(recipient, where)
    return rejection


def _check_identifier(recipient: dict[str, Any], kind: str, where: str) -> Rejection | None:
    value = recipient[kind]
    if kind == "external_user_id":
        if not isinstance(value, str) or not value:
            return _bad(f"{where}.external_user_id must be a non-empty string")
    elif kind == "user_alias":
        if (
            not isinstance(value, dict)
            or value.keys() != {"alias_name", "alias_label"}
            or not all(isinstance(part, str) and part for part in value.values())
        ):
            return _bad(f"{where}.user_alias needs alias_name and alias_label, non-empty strings")
    else:
        local, at, domain = value.partition("@") if isinstance(value, str) else ("", "", "")
        if not (local and at and domain) or "@" in domain:
            return _bad(f"{where}.email must be a valid email address")
        return _check_prioritization(recipient.get("prioritization"), where)
    # `prioritization` without email: Braze requires it with email, forbids it nowhere (point 22).
    return None


def _check_prioritization(value: Any, where: str) -> Rejection | None:
    field = f"{where}.prioritization"
    if not isinstance(value, list) or not value:
        return _bad(f"{field} is required with email and must be a non-empty array")
    if not all(isinstance(item, str) and item in PRIORITIZATION_VALUES for item in value):
        return _bad(f"{field} values must be among: {', '.join(sorted(PRIORITIZATION_VALUES))}")
    if "identified" in value and "unidentified" in value:
        return _bad(f"{field} may contain only one of identified and unidentified")
    return None


def _check_existing_only(recipient: dict[str, Any], where: str) -> Rejection | None:
    existing_only = recipient.get("send_to_existing_only", True)
    if not isinstance(existing_only, bool):
        return _bad(f"{where}.send_to_existing_only must be a boolean")
    attributes = recipient.get("attributes")
    if "attributes" in recipient and not isinstance(attributes, dict):
        return _bad(f"{where}.attributes must be an object")
    if "user_alias" in recipient and "send_to_existing_only" in recipient:
        return _bad(f"{where}: send_to_existing_only cannot be used with user_alias")
    if not existing_only and not attributes:
        return _bad(f"{where}: send_to_existing_only false needs a non-empty attributes object")
    return None


def check_audience(node: Any, depth: int = 0) -> Rejection | None:
    """Check a Connected Audience node against the grammar of CONTRACT.md section 3.1.

    `depth` counts the AND / OR groups around `node`, as the gateway's `validate` counts it:
    the guard must refuse exactly what the gateway refuses, or a request the gateway
    sends would fail here (Braze itself documents no limit: CONTRACT 8, point 25)."""
    if depth > MAX_AUDIENCE_DEPTH:
        return _bad(f"audience is nested deeper than {MAX_AUDIENCE_DEPTH} levels")
    if not isinstance(node, dict) or len(node) != 1:
        return _bad("Each audience node must be an object with exactly one key")
    ((key, value),) = node.items()
    if key in ("AND", "OR"):
        if not isinstance(value, list) or not value:
            return _bad(f"audience {key} must be a non-empty array of audience objects")
        for child in value:
            rejection = check_audience(child, depth + 1)
            if rejection is not None:
                return rejection
        return None
    if key not in FILTER_KEYS:
        return _bad(f"Unknown audience filter: {key}")
    if not isinstance(value, dict):
        return _bad(f"audience {key} must be an object")
    if key == "custom_attribute":
        return _check_custom_attribute(value)
    if key == "last_used_app":
        return _check_pair(value, key, LAST_USED_APP_COMPARISONS, None) or _check_time(value["value"])
    return _check_pair(value, key, SUBSCRIPTION_COMPARISONS, SUBSCRIPTION_VALUES)


def _check_custom_attribute(spec: dict[str, Any]) -> Rejection | None:
    if not spec.keys() <= {"custom_attribute_name", "comparison", "value"}:
        return _bad("custom_attribute accepts only custom_attribute_name, comparison and value")
    name, comparison = spec.get("custom_attribute_name"), spec.get("comparison")
    if not isinstance(name, str) or not name:
        return _bad("custom_attribute_name must be a non-empty string")
    if not isinstance(comparison, str) or not comparison:
        return _bad("custom_attribute comparison must be a non-empty string")
    if comparison in VALUELESS_COMPARISONS:
        return None  # a `value` here is not documented as an error: accepted (point 23)
    if not isinstance(spec.get("value"), str | int | float):
        return _bad("custom_attribute value must be a string, number or boolean")
    return None


def _check_time(value: str) -> Rejection | None:
    """Braze documents an ISO 8601 date-time with its offset, e.g. 2019-07-22T13:17:55+0000."""
    if is_iso_datetime(value):
        return None
    return _bad("last_used_app value must be an ISO 8601 date-time with a time zone")


def _check_pair(
    spec: dict[str, Any], key: str, comparisons: frozenset[str], values: frozenset[str] | None
) -> Rejection | None:
    if spec.keys() != {"comparison", "value"}:
        return _bad(f"{key} requires exactly comparison and value")
    comparison, value = spec["comparison"], spec["value"]
    # Membership tests on frozensets need hashable input; JSON arrays and objects are not.
    if not isinstance(comparison, str) or comparison not in comparisons:
        return _bad(f"{key} comparison must be one of: {', '.join(sorted(comparisons))}")
    if not isinstance(value, str) or not value:
        return _bad(f"{key} value must be a non-empty string")
    if values is not None and value not in values:
        return _bad(f"{key} value must be one of: {', '.join(sorted(values))}")
    return None
