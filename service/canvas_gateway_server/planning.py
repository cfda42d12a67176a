"""One request's way from Braze JSON to batches: validate, authorize, encode, cut.

Pure: no I/O. `Intake` takes recipients one at a time, in caller order, so a stream of
any length is planned with memory for one open batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .batching import BatchPlanner, broadcast_batch, encode_head
from .errors import InvalidRequest, PermissionDenied
from .model import Batch, Violation
from .tenants import Tenant
from .validate import ContextNames, check_head, check_recipient


def authorize(tenant: Tenant, head: Mapping[str, Any]) -> None:
    """Broadcast and Connected Audience sends reach many users: only tenants allowed to may."""
    if (head.get("broadcast") is True or "audience" in head) and not tenant.allow_broadcast:
        raise PermissionDenied("this tenant may not send broadcast or audience requests")


class Intake:
    """Validated, encoded recipients cut into batches of at most 50 and 4 MB.

    Raises InvalidRequest at construction when the top-level fields are invalid.
    """

    def __init__(self, head: Mapping[str, Any]) -> None:
        violations = check_head(head)
        encoded = violations or encode_head(head)
        if isinstance(encoded, list):
            raise InvalidRequest(encoded)
        self.head = head
        self.head_json = encoded
        self._context_names = ContextNames(head)
        self._planner = BatchPlanner(encoded)
        self.received = 0
        """Recipients taken so far, valid or not: the next recipient's position."""

    def take(self, recipient: Mapping[str, Any]) -> tuple[int, Batch | list[Violation] | None]:
        """Take the next recipient: its position, and the batch it closed or its violations."""
        position = self.received
        self.received += 1
        path = f"recipients[{position}]"
        found = check_recipient(recipient, path)
        if found:
            return position, found
        encoded = self._planner.encode(recipient, path)
        if isinstance(encoded, list):
            return position, encoded
        # Last, so that only a recipient that will be sent can fix the request's context name.
        found = self._context_names.check(recipient, path)
        if found:
            return position, found
        return position, self._planner.add(position, encoded)

    def finish(self) -> Batch | None:
        """The last, partly filled batch, if any."""
        return self._planner.flush()

    def reserve_index(self) -> int:
        """An index for a result that is not a planned batch (a rejected recipient)."""
        return self._planner.reserve_index()

    def broadcast(self) -> Batch:
        """The single call of a broadcast request."""
        return broadcast_batch(self.head_json)
