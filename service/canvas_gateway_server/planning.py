"""One request's way from Braze JSON to batches: check and encode each part once, then cut.

Pure: no I/O. `Intake` takes recipients one at a time, in caller order, so a stream of any
length is planned with memory for one open batch. It never raises for bad input: the head's
violations are in `head_violations`, and each recipient's come back on its `Taken`, so a
caller can report every violation of a request at once (unary `Send`) or reject recipients
one by one (`SendStream`).

The context object goes out under the tenant's name for it: `context`, or the legacy
`canvas_entry_properties` for workspaces that still use it (CONTRACT.md section 8, point 2).
Callers may use either name; one object naming both is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from .batching import BatchPlanner, broadcast_batch
from .braze import CONTEXT_NAMES, MAX_BODY_BYTES, MAX_CONTEXT_BYTES
from .errors import PermissionDenied
from .model import Batch, Violation
from .tenants import Tenant
from .validate import BODY_FRAME, check_and_encode, check_head, encode_head


def authorize(tenant: Tenant, head: Mapping[str, Any]) -> None:
    """Broadcast and Connected Audience sends reach many users: only tenants allowed to may."""
    if (head.get("broadcast") is True or "audience" in head) and not tenant.allow_broadcast:
        raise PermissionDenied("this tenant may not send broadcast or audience requests")


class Taken(NamedTuple):
    """What taking one recipient did: accepted (no violations), or rejected with its violations.

    An accepted recipient may have completed a batch: `closed` is that batch. (A NamedTuple:
    one is made per recipient, and it is cheaper to build than a frozen dataclass.)
    """

    position: int
    violations: tuple[Violation, ...] = ()
    closed: Batch | None = None


class Intake:
    """Checked, encoded recipients cut into batches of at most 50 and 4 MB."""

    def __init__(
        self,
        head: Mapping[str, Any],
        context_name: str = "context",
        audience_budget: str = "any_audience",
        lane: str = "",
    ) -> None:
        self._context_name = context_name
        self._other_name = CONTEXT_NAMES[1] if context_name == CONTEXT_NAMES[0] else CONTEXT_NAMES[0]
        self.head = head
        # Violations name the caller's own fields: check as given, rename (and encode again) after.
        encoded, found = encode_head(head)
        if not found and _named(head, context_name) is not head:
            encoded, found = encode_head(_named(head, context_name))
        self.head_violations = (*check_head(head), *found)
        """Top-level violations: while there are any, nothing is batched (recipients are still checked)."""
        self.head_json = encoded or b"{}"
        self._head_size = len(self.head_json)
        # Only a valid head is digested: one that is not may hold what JSON cannot carry.
        self._audience = "" if self.head_violations else audience_digest(head)
        self._lane = lane
        self._planner = BatchPlanner(
            self.head_json,
            broadcast_budget="audience" in head and audience_budget == "any_audience",
            audience=self._audience,
            lane=lane,
        )
        self.received = 0
        """Recipients taken so far, valid or not: the next recipient's position."""

    def take(self, recipient: Mapping[str, Any]) -> Taken:
        """Check and encode the next recipient, and batch it when it and the head are valid."""
        position = self.received
        self.received += 1
        encoded, found = check_and_encode(recipient, position, self._head_size)
        if not found and self._other_name in recipient:  # the caller used the other name: rename
            encoded, found = check_and_encode(
                _named(recipient, self._context_name), position, self._head_size
            )
        if found:
            return Taken(position, tuple(found), None)
        if self.head_violations:
            return Taken(position, (), None)
        # Positional: a NamedTuple built with keywords costs twice as much, once per recipient.
        return Taken(position, (), self._planner.add(position, encoded))

    @property
    def context_name(self) -> str:
        """The name the tenant's Braze workspace gives the context object."""
        return self._context_name

    @property
    def encoded_limit(self) -> int:
        """The largest recipient, as JSON, that `take_encoded` may be given: one that breaks no size
        rule of `check_and_encode` beside this head."""
        return min(MAX_CONTEXT_BYTES, MAX_BODY_BYTES - BODY_FRAME - self._head_size)

    def take_encoded(self, encoded: bytes) -> Batch | None:
        """`take` for a recipient already checked and encoded elsewhere (`edge.native`): JSON that
        `check_and_encode` would have made, under this intake's context name and within
        `encoded_limit`, so it breaks no rule. Returns the batch it closed, if any (no `Taken`:
        this runs once per recipient, and nothing is rejected here)."""
        position = self.received
        self.received += 1
        if self.head_violations:
            return None
        return self._planner.add(position, encoded)

    @property
    def open(self) -> bool:
        """Recipients wait in a batch that is not full yet."""
        return self._planner.open

    def finish(self) -> Batch | None:
        """The last, partly filled batch, if any."""
        return self._planner.flush()

    def reserve_index(self) -> int:
        """An index for a result that is not a planned batch (a rejected recipient)."""
        return self._planner.reserve_index()

    def broadcast(self) -> Batch:
        """The single call of a broadcast request."""
        return broadcast_batch(self.head_json, self._audience, self._lane)


def audience_digest(head: Mapping[str, Any]) -> str:
    """A unique audience (CONTRACT.md 8, point 18): its `canvas_id` and `audience` object, keys
    sorted, digested (as the fake's `ratelimit.audience_key` identifies it)."""
    canonical = orjson.dumps([head.get("canvas_id"), head.get("audience")], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def _named(obj: Mapping[str, Any], context_name: str) -> Mapping[str, Any]:
    """`obj` with its context under `context_name` (a copy only when it must be renamed)."""
    other = CONTEXT_NAMES[1] if context_name == CONTEXT_NAMES[0] else CONTEXT_NAMES[0]
    if other not in obj or context_name in obj:  # nothing to rename, or both (a violation)
        return obj
    return {(context_name if key == other else key): value for key, value in obj.items()}
