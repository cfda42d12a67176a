"""Every request rule, in one place: Braze's (CONTRACT.md sections 2 and 3) and the gateway's own.

Pure functions over the Braze JSON produced by `convert`: no I/O, no protobuf. Violations
name a path in Braze's JSON names, such as `recipients[3].email` or
`audience.AND[2].OR[0].custom_attribute.comparison`, and a bounded `Rule`.

Rules that need the JSON bytes (sizes, and numbers JSON cannot carry exactly) are checked
where each object is encoded, once: `encode_head` and `encode_recipient` return the bytes
that `batching` will join, or the violations.
Those bytes are canonical (keys sorted at every depth), so a body depends on what the
request means, not on the order its map entries came in.

Strict only where Braze is: what Braze documents as an error is refused here, before any
call; what it does not (a `prioritization` without `email`, repeated prioritization values,
a `value` with `exists`) is passed through for Braze to answer (docs/braze/CONTRACT.md,
section 8, points 22 to 25).

Longer than 300 lines on purpose: the rules are read and reviewed against CONTRACT.md as one
list, top to bottom, and split by topic they would share their path-building helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from .braze import (
    AUDIENCE_KEYS,
    CONTEXT_NAMES,
    IDENTIFIERS,
    LAST_USED_APP_COMPARISONS,
    MAX_AUDIENCE_DEPTH,
    MAX_BODY_BYTES,
    MAX_CONTEXT_BYTES,
    PRIORITIZATION_VALUES,
    SUBSCRIPTION_COMPARISONS,
    SUBSCRIPTION_VALUES,
    VALUELESS_COMPARISONS,
    is_iso_datetime,
)
from .model import Rule, Violation

BODY_FRAME: Final = len(b',"recipients":[]}') - len(b"}")
"""What a body adds to the head's JSON besides the recipients (and the commas between them):
the head's closing brace becomes `,"recipients":[` ... `]}`."""
_BOTH_NAMES: Final = "set `context` or its legacy name `canvas_entry_properties`, not both"
_NOT_JSON: Final = (
    "holds a number that cannot be sent exactly: NaN, infinity, or a magnitude of 2^53 or more "
    "(protobuf's Struct carries numbers as doubles, so big integers arrive rounded; send them as strings)"
)


def check_head(head: Mapping[str, Any]) -> list[Violation]:
    """Top-level rules that do not depend on the recipients."""
    found: list[Violation] = []
    if not head.get("canvas_id"):
        found.append(Violation("canvas_id", "is required", Rule.CANVAS_ID_REQUIRED))
    if all(name in head for name in CONTEXT_NAMES):
        found.append(Violation("canvas_entry_properties", _BOTH_NAMES, Rule.CONTEXT_BOTH_NAMES))
    if "audience" in head:
        found.extend(check_audience(head["audience"], "audience"))
    return found


def check_unary_count(count: int, cap: int) -> list[Violation]:
    """The gateway's own cap on one unary Send (CGW_UNARY_MAX_RECIPIENTS)."""
    if count > cap:
        why = f"at most {cap:,} per Send; use SendStream for more"
        return [Violation("recipients", why, Rule.TOO_MANY_RECIPIENTS)]
    return []


_KEY_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
MAX_KEY_LENGTH: Final = 128


def check_idempotency_key(key: str) -> list[Violation]:
    """SendOptions.idempotency_key: empty (none), or 1 to 128 of [A-Za-z0-9._:-]."""
    if len(key) > MAX_KEY_LENGTH or not _KEY_CHARS.issuperset(key):
        why = f"at most {MAX_KEY_LENGTH} characters from A-Z, a-z, 0-9 and . _ : -"
        return [Violation("options.idempotency_key", why, Rule.IDEMPOTENCY_KEY)]
    return []


def check_stream_head(head: Mapping[str, Any]) -> list[Violation]:
    """A stream carries recipients: a broadcast is one call, and belongs in Send."""
    if head.get("broadcast") is True:
        return [Violation("broadcast", "SendStream does not broadcast; use Send", Rule.STREAM_BROADCAST)]
    return []


def check_recipient_count(head: Mapping[str, Any], count: int) -> list[Violation]:
    """`broadcast` XOR `recipients` (an audience alone also needs broadcast: true)."""
    if head.get("broadcast") is True and count > 0:
        return [
            Violation(
                "broadcast", "must not be true when recipients are given", Rule.BROADCAST_WITH_RECIPIENTS
            )
        ]
    if head.get("broadcast") is not True and count == 0:
        what = "an audience without recipients" if "audience" in head else "no recipients"
        return [
            Violation(
                "recipients",
                f"at least one recipient is required ({what} needs broadcast: true)",
                Rule.RECIPIENTS_REQUIRED,
            )
        ]
    return []


def check_recipient(recipient: Mapping[str, Any], path: str) -> list[Violation]:
    """Rules for one recipient; `path` is its own path, e.g. `recipients[7]`."""
    found: list[Violation] = []
    present = [name for name in IDENTIFIERS if name in recipient]
    if len(present) != 1:
        found.append(
            Violation(
                path, "exactly one of external_user_id, user_alias, email is required", Rule.IDENTIFIER_COUNT
            )
        )
    if "external_user_id" in recipient and not recipient["external_user_id"]:
        found.append(Violation(f"{path}.external_user_id", "must not be empty", Rule.EXTERNAL_USER_ID_EMPTY))
    if "user_alias" in recipient:
        alias = recipient["user_alias"]
        for part in ("alias_name", "alias_label"):
            if not alias.get(part):
                found.append(
                    Violation(f"{path}.user_alias.{part}", "is required", Rule.USER_ALIAS_INCOMPLETE)
                )
        if "send_to_existing_only" in recipient:
            found.append(
                Violation(
                    f"{path}.send_to_existing_only",
                    "cannot be used with user_alias (alias users must already exist): leave it out",
                    Rule.EXISTING_ONLY_WITH_ALIAS,
                )
            )
    if "email" in recipient:
        found.extend(_check_email(recipient, path))
    if "context" in recipient and "canvas_entry_properties" in recipient:  # per recipient: no generator
        found.append(Violation(f"{path}.canvas_entry_properties", _BOTH_NAMES, Rule.CONTEXT_BOTH_NAMES))
    if recipient.get("send_to_existing_only") is False and not recipient.get("attributes"):
        found.append(
            Violation(
                f"{path}.attributes",
                "a non-empty object is required when send_to_existing_only is false",
                Rule.ATTRIBUTES_REQUIRED,
            )
        )
    return found


def _check_email(recipient: Mapping[str, Any], path: str) -> list[Violation]:
    found: list[Violation] = []
    local, at, domain = str(recipient["email"]).partition("@")
    if not (local and at and domain) or "@" in domain:
        found.append(Violation(f"{path}.email", "must be an email address (name@domain)", Rule.EMAIL_FORMAT))
    order = recipient.get("prioritization") or []
    field = f"{path}.prioritization"
    if not order:
        found.append(Violation(field, "is required with email", Rule.PRIORITIZATION_REQUIRED))
    for index, value in enumerate(order):
        if value not in PRIORITIZATION_VALUES:
            allowed = ", ".join(sorted(PRIORITIZATION_VALUES))
            found.append(
                Violation(f"{field}[{index}]", f"must be one of {allowed}", Rule.PRIORITIZATION_VALUE)
            )
    if "identified" in order and "unidentified" in order:
        found.append(
            Violation(field, "may hold only one of identified and unidentified", Rule.PRIORITIZATION_CONFLICT)
        )
    return found


def check_audience(node: Any, path: str, depth: int = 0) -> list[Violation]:
    """The Connected Audience grammar: one key per node; AND / OR nest."""
    if depth > MAX_AUDIENCE_DEPTH:
        return [Violation(path, f"nests deeper than {MAX_AUDIENCE_DEPTH} levels", Rule.AUDIENCE_DEPTH)]
    if not isinstance(node, Mapping):
        return [Violation(path, "must be an object", Rule.AUDIENCE_NODE)]
    keys = [key for key in node if key in AUDIENCE_KEYS]
    if len(keys) != 1 or len(node) != 1:
        return [Violation(path, "must hold exactly one of " + ", ".join(AUDIENCE_KEYS), Rule.AUDIENCE_NODE)]
    key = keys[0]
    inner = node[key]
    here = f"{path}.{key}"
    if key in ("AND", "OR"):
        if not inner:
            return [Violation(here, "must list at least one filter", Rule.AUDIENCE_EMPTY_GROUP)]
        found: list[Violation] = []
        for index, child in enumerate(inner):
            found.extend(check_audience(child, f"{here}[{index}]", depth + 1))
        return found
    if key == "custom_attribute":
        return _check_custom_attribute(inner, here)
    if key == "last_used_app":
        return _check_last_used_app(inner, here)
    return _check_subscription(inner, here)


def _check_custom_attribute(attr: Mapping[str, Any], path: str) -> list[Violation]:
    found: list[Violation] = []
    if not attr.get("custom_attribute_name"):
        found.append(Violation(f"{path}.custom_attribute_name", "is required", Rule.AUDIENCE_ATTRIBUTE_NAME))
    comparison = attr.get("comparison")
    if not comparison:
        found.append(Violation(f"{path}.comparison", "is required", Rule.AUDIENCE_COMPARISON))
    if comparison in VALUELESS_COMPARISONS:
        pass  # Braze says `value` is omitted here, not that one is an error: passed through (point 23)
    elif "value" not in attr:
        found.append(Violation(f"{path}.value", "is required", Rule.AUDIENCE_VALUE))
    elif isinstance(attr["value"], (dict, list)) or attr["value"] is None:
        found.append(Violation(f"{path}.value", "must be a string, number or boolean", Rule.AUDIENCE_VALUE))
    return found


def _check_subscription(status: Mapping[str, Any], path: str) -> list[Violation]:
    found: list[Violation] = []
    if status.get("comparison") not in SUBSCRIPTION_COMPARISONS:
        found.append(Violation(f"{path}.comparison", "must be is or is_not", Rule.AUDIENCE_COMPARISON))
    if status.get("value") not in SUBSCRIPTION_VALUES:
        found.append(
            Violation(f"{path}.value", "must be opted_in, subscribed or unsubscribed", Rule.AUDIENCE_VALUE)
        )
    return found


def _check_last_used_app(filter_: Mapping[str, Any], path: str) -> list[Violation]:
    found: list[Violation] = []
    if filter_.get("comparison") not in LAST_USED_APP_COMPARISONS:
        found.append(Violation(f"{path}.comparison", "must be after or before", Rule.AUDIENCE_COMPARISON))
    if not is_iso_datetime(filter_.get("value")):
        example = "2019-07-22T13:17:55+0000"
        found.append(
            Violation(
                f"{path}.value",
                f"must be an ISO 8601 date-time with a time zone, e.g. {example}",
                Rule.AUDIENCE_VALUE,
            )
        )
    return found


def encode_head(head: Mapping[str, Any]) -> tuple[bytes, list[Violation]]:
    """The top-level body as JSON, or why it cannot be sent (sizes, numbers)."""
    encoded = _encode(head)
    if encoded is None or any(
        len(_encode(head[name]) or b"") > MAX_CONTEXT_BYTES for name in _contexts(head)
    ):
        return b"", _check_parts(head, "")
    # A body is the head plus at least one recipient (or the head alone for broadcasts).
    if len(encoded) + BODY_FRAME > MAX_BODY_BYTES:
        return b"", [Violation("trigger", _too_big(MAX_BODY_BYTES), Rule.BODY_TOO_LARGE)]
    return encoded, []


def encode_recipient(
    recipient: Mapping[str, Any], path: str, head_size: int
) -> tuple[bytes, list[Violation]]:
    """One recipient as JSON, or why it cannot be sent: sizes (against a head of `head_size`
    bytes) and numbers JSON cannot carry exactly."""
    encoded = _encode(recipient)
    if encoded is None or len(encoded) > MAX_CONTEXT_BYTES:
        found = _check_parts(recipient, path)
        if found:
            return b"", found
    assert encoded is not None
    if head_size + BODY_FRAME + len(encoded) > MAX_BODY_BYTES:
        why = f"makes the request body larger than {MAX_BODY_BYTES:,} bytes on its own"
        return b"", [Violation(path, why, Rule.BODY_TOO_LARGE)]
    return encoded, []


def check_and_encode(
    recipient: Mapping[str, Any], position: int, head_size: int
) -> tuple[bytes, list[Violation]]:
    """Recipient `position` checked and encoded in one pass: its JSON bytes, or its violations.

    The common recipient (a non-empty `external_user_id`, perhaps a `context`) breaks no rule
    of `check_recipient`, so it goes straight to the encoder; its path is only spelled out
    when something is wrong."""
    if not _is_plain(recipient):
        found = check_recipient(recipient, f"recipients[{position}]")
        if found:
            return b"", found
    encoded = _encode(recipient)
    if (
        encoded is None
        or len(encoded) > MAX_CONTEXT_BYTES
        or head_size + BODY_FRAME + len(encoded) > MAX_BODY_BYTES
    ):
        return encode_recipient(recipient, f"recipients[{position}]", head_size)  # names the culprit
    return encoded, []


_PLAIN_KEYS: Final = frozenset({"external_user_id", "context"})


def _is_plain(recipient: Mapping[str, Any]) -> bool:
    return recipient.keys() <= _PLAIN_KEYS and bool(recipient.get("external_user_id"))


def _contexts(obj: Mapping[str, Any]) -> list[str]:
    return [name for name in CONTEXT_NAMES if name in obj]


def _encode(value: Any) -> bytes | None:
    """Canonical JSON: keys sorted at every depth. A Struct's keys arrive in the map order of
    the caller's encoder and of upb's per-process hash, neither of which means anything; sorted,
    the same request is the same body in every process, and so is its idempotency digest."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # convert's NOT_JSON marker, or a NaN or infinity
        return None


def _too_big(limit: int) -> str:
    return f"is larger than {limit:,} bytes as JSON"


def _check_parts(obj: Mapping[str, Any], path: str) -> list[Violation]:
    """Which part of `obj` failed to encode or is oversized, for a precise path."""
    found: list[Violation] = []
    for key, value in obj.items():
        where = f"{path}.{key}" if path else key
        encoded = _encode(value)
        if encoded is None:
            found.append(Violation(where, _NOT_JSON, Rule.NUMBER_NOT_EXACT))
        elif key in CONTEXT_NAMES and len(encoded) > MAX_CONTEXT_BYTES:
            found.append(Violation(where, _too_big(MAX_CONTEXT_BYTES), Rule.CONTEXT_TOO_LARGE))
    return found
