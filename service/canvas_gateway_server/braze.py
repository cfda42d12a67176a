"""Braze's documented contract for `POST /canvas/trigger/send`, as one table of constants.

The gateway's validation and the fake Braze (`fake_braze`) both read these, so the two can
never disagree on a limit, a name or an allowed value. Sources are in docs/braze/CONTRACT.md;
where Braze documents nothing the value says so.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final

TRIGGER_PATH: Final = "/canvas/trigger/send"

MAX_RECIPIENTS_PER_CALL: Final = 50
"""`recipients` per call (CONTRACT 2.3 rule 2)."""
MAX_BODY_BYTES: Final = 4_000_000
"""The request body limit, 4 MB, read conservatively as decimal bytes (CONTRACT 2.2, 8 point 6)."""
MAX_CONTEXT_BYTES: Final = 50_000
"""Each serialized context object, 50 KB, read conservatively (CONTRACT 2.2, 8 point 6)."""
MAX_AUDIENCE_DEPTH: Final = 32
"""Braze documents no nesting limit (CONTRACT 8 point 16); both sides apply this guard so that
recursion stays bounded. A deeper audience is refused by the gateway and by the fake alike."""

CONTEXT_NAMES: Final = ("context", "canvas_entry_properties")
"""The context object and its legacy name: the same thing (CONTRACT 8 point 2)."""
IDENTIFIERS: Final = ("external_user_id", "user_alias", "email")
"""A recipient names exactly one (CONTRACT 2.3 rule 3)."""
TOP_LEVEL_FIELDS: Final = frozenset({"canvas_id", *CONTEXT_NAMES, "broadcast", "audience", "recipients"})
RECIPIENT_FIELDS: Final = frozenset(
    {*IDENTIFIERS, "prioritization", *CONTEXT_NAMES, "send_to_existing_only", "attributes"}
)

PRIORITIZATION_VALUES: Final = frozenset(
    {"identified", "unidentified", "most_recently_updated", "least_recently_updated"}
)
"""CONTRACT 2.6; at most one of `identified` and `unidentified` may appear."""

AUDIENCE_FILTERS: Final = (
    "custom_attribute",
    "push_subscription_status",
    "email_subscription_status",
    "last_used_app",
)
AUDIENCE_KEYS: Final = ("AND", "OR", *AUDIENCE_FILTERS)
VALUELESS_COMPARISONS: Final = frozenset({"exists", "does_not_exist"})
SUBSCRIPTION_COMPARISONS: Final = frozenset({"is", "is_not"})
SUBSCRIPTION_VALUES: Final = frozenset({"opted_in", "subscribed", "unsubscribed"})
LAST_USED_APP_COMPARISONS: Final = frozenset({"after", "before"})

PAUSED_NOTICE: Final = "The Canvas is paused. Resume the Canvas to ensure trigger requests will take effect."
ARCHIVED_NOTICE: Final = (
    "The Canvas is archived. Unarchive the Canvas to ensure trigger requests will take effect."
)

_ISO_DATETIME: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$")


def is_iso_datetime(value: object) -> bool:
    """An ISO 8601 date-time with a time zone, as `last_used_app` needs (CONTRACT 3.1)."""
    if not isinstance(value, str) or not _ISO_DATETIME.match(value):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
