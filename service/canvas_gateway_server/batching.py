"""Encoded recipients become REST bodies: at most 50 recipients and 4 MB each, in caller order.

Pure: no I/O and no rules (`validate` checked and encoded every part). A batch body is the
request's encoded head (every top-level field but `recipients`) plus the encoded recipients,
joined as bytes, so the hot path never re-serialises the shared context.
"""

from __future__ import annotations

from typing import Final

from .braze import MAX_BODY_BYTES, MAX_RECIPIENTS_PER_CALL
from .model import Batch

_RECIPIENTS_KEY: Final = b',"recipients":['
_CLOSE: Final = b"]}"


class BatchPlanner:
    """Closes a batch at 50 recipients, or earlier when the next one would pass 4 MB.

    `index` counts every result a request produces, so a recipient rejected in a stream
    takes an index too (`reserve_index`): indices are unique and follow input order.
    """

    def __init__(
        self, head_json: bytes, broadcast_budget: bool = False, audience: str = "", lane: str = ""
    ) -> None:
        self._broadcast_budget = broadcast_budget
        self._audience = audience if broadcast_budget else ""
        self._lane = lane
        self._prefix = head_json[:-1] + _RECIPIENTS_KEY
        self._base_size = len(self._prefix) + len(_CLOSE)
        self._positions: list[int] = []
        self._parts: list[bytes] = []
        self._size = self._base_size
        self.index = 0

    def add(self, position: int, encoded: bytes) -> Batch | None:
        """Queue a recipient; returns the batch this closed, if any."""
        closed = None
        if self._parts and self._size + 1 + len(encoded) > MAX_BODY_BYTES:
            closed = self.flush()  # leaves this recipient alone in a new batch
        self._size += len(encoded) + (1 if self._parts else 0)
        self._positions.append(position)
        self._parts.append(encoded)
        if len(self._parts) == MAX_RECIPIENTS_PER_CALL:
            return self.flush()
        return closed

    @property
    def open(self) -> bool:
        """A batch holds recipients that no call has taken yet."""
        return bool(self._parts)

    def flush(self) -> Batch | None:
        """Close the open batch, if it holds anyone."""
        if not self._parts:
            return None
        body = self._prefix + b",".join(self._parts) + _CLOSE
        batch = Batch(
            self.reserve_index(),
            tuple(self._positions),
            body,
            self._broadcast_budget,
            self._audience,
            self._lane,
        )
        self._positions = []
        self._parts = []
        self._size = self._base_size
        return batch

    def reserve_index(self) -> int:
        index = self.index
        self.index += 1
        return index


def broadcast_batch(head_json: bytes, audience: str = "", lane: str = "") -> Batch:
    """A broadcast or audience send is one call, with no recipients key."""
    return Batch(index=0, positions=(), body=head_json, broadcast=True, audience=audience, lane=lane)
