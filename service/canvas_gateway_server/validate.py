"""Braze's request rules (CONTRACT.md sections 2 and 3), checked before anything is sent.

Pure functions over the Braze JSON produced by `convert`: no I/O, no protobuf. Each
returns violations whose `field` is a path in Braze's JSON names, such as
`recipients[3].email` or `audience.AND[2].OR[0].custom_attribute.comparison`.
Sizes are checked where the JSON is encoded (`batching`), since that is where the
bytes exist.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from .model import Rule, Violation

PRIORITIZATION_VALUES: Final = frozenset(
    {"identified", "unidentified", "most_recently_updated", "least_recently_updated"}
)
SUBSCRIPTION_COMPARISONS: Final = frozenset({"is", "is_not"})
SUBSCRIPTION_VALUES: Final = frozenset({"opted_in", "subscribed", "unsubscribed"})
LAST_USED_APP_COMPARISONS: Final = frozenset({"after", "before"})
VALUELESS_COMPARISONS: Final = frozenset({"exists", "does_not_exist"})
AUDIENCE_KEYS: Final = (
    "AND",
    "OR",
    "custom_attribute",
    "push_subscription_status",
    "email_subscription_status",
    "last_used_app",
)
ISO_DATETIME: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$")
MAX_AUDIENCE_DEPTH: Final = 32
"""Braze documents no depth limit; this guard only keeps recursion bounded."""

_IDENTIFIERS: Final = ("external_user_id", "user_alias", "email")
_CONTEXT_NAMES: Final = ("context", "canvas_entry_properties")
_LEGACY_CONTEXT: Final = "set `context` or its legacy name `canvas_entry_properties`, not both"


def check_head(head: Mapping[str, Any]) -> list[Violation]:
    """Top-level rules that do not depend on the recipients."""
    found: list[Violation] = []
    if not head.get("canvas_id"):
        found.append(Violation("canvas_id", "is required", Rule.CANVAS_ID_REQUIRED))
    if "context" in head and "canvas_entry_properties" in head:
        found.append(Violation("canvas_entry_properties", _LEGACY_CONTEXT, Rule.CONTEXT_BOTH_NAMES))
    if "audience" in head:
        found.extend(check_audience(head["audience"], "audience"))
    return found


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


class ContextNames:
    """One request uses one name for its context, `context` or the legacy
    `canvas_entry_properties`, throughout, so Braze never gets both (CONTRACT.md section 8.2).
    The top level fixes the name, or else the first recipient that uses one."""

    def __init__(self, head: Mapping[str, Any]) -> None:
        self.name = next((name for name in _CONTEXT_NAMES if name in head), None)

    def check(self, recipient: Mapping[str, Any], path: str) -> list[Violation]:
        used = [name for name in _CONTEXT_NAMES if name in recipient]
        if len(used) != 1:
            return []  # none, or both (which check_recipient reports)
        if self.name is None:
            self.name = used[0]
        elif used[0] != self.name:
            return [
                Violation(
                    f"{path}.{used[0]}",
                    f"this request uses `{self.name}`: use that name throughout",
                    Rule.CONTEXT_MIXED_NAMES,
                )
            ]
        return []


def check_recipient(recipient: Mapping[str, Any], path: str) -> list[Violation]:
    """Rules for one recipient; `path` is its own path, e.g. `recipients[7]`."""
    found: list[Violation] = []
    present = [name for name in _IDENTIFIERS if name in recipient]
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
    elif "prioritization" in recipient:
        found.append(
            Violation(
                f"{path}.prioritization", "is only allowed with email", Rule.PRIORITIZATION_WITHOUT_EMAIL
            )
        )
    if "context" in recipient and "canvas_entry_properties" in recipient:
        found.append(Violation(f"{path}.canvas_entry_properties", _LEGACY_CONTEXT, Rule.CONTEXT_BOTH_NAMES))
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
    if len(set(order)) != len(order):
        found.append(Violation(field, "must not repeat a value", Rule.PRIORITIZATION_REPEATED))
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
        if "value" in attr:
            found.append(
                Violation(f"{path}.value", f"must be omitted with {comparison}", Rule.AUDIENCE_VALUE)
            )
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
    if not _is_iso_datetime(str(filter_.get("value", ""))):
        example = "2019-07-22T13:17:55+0000"
        found.append(
            Violation(
                f"{path}.value",
                f"must be an ISO 8601 date-time with a time zone, e.g. {example}",
                Rule.AUDIENCE_VALUE,
            )
        )
    return found


def _is_iso_datetime(value: str) -> bool:
    if not ISO_DATETIME.match(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
