"""Recipients become REST bodies: at most 50 recipients and 4 MB each, in caller order.

Pure: no I/O. Each recipient is encoded to JSON once; a batch body is the request's
encoded head (every top-level field but `recipients`) plus the encoded recipients,
joined as bytes, so the hot path never re-serialises the shared context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from .model import MAX_BODY_BYTES, MAX_CONTEXT_BYTES, MAX_RECIPIENTS_PER_CALL, Batch, Rule, Violation

_RECIPIENTS_KEY: Final = b',"recipients":['
_CLOSE: Final = b"]}"
_CONTEXT_KEYS: Final = ("context", "canvas_entry_properties")
_NOT_JSON: Final = (
    "holds a number that cannot be sent exactly: NaN, infinity, or a magnitude of 2^53 or more "
    "(protobuf's Struct carries numbers as doubles, so big integers arrive rounded; send them as strings)"
)


def _too_big(limit: int) -> str:
    return f"is larger than {limit:,} bytes as JSON"


def _encode(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None


def _check_parts(obj: Mapping[str, Any], path: str) -> list[Violation]:
    """Find which part of `obj` failed to encode or is oversized, for a precise path."""
    found: list[Violation] = []
    for key, value in obj.items():
        where = f"{path}.{key}" if path else key
        encoded = _encode(value)
        if encoded is None:
            found.append(Violation(where, _NOT_JSON, Rule.NUMBER_NOT_EXACT))
        elif key in _CONTEXT_KEYS and len(encoded) > MAX_CONTEXT_BYTES:
            found.append(Violation(where, _too_big(MAX_CONTEXT_BYTES), Rule.CONTEXT_TOO_LARGE))
    return found


def encode_head(head: Mapping[str, Any]) -> bytes | list[Violation]:
    """The top-level body as JSON, or why it cannot be sent."""
    encoded = _encode(head)
    largest_context = max((len(_encode(head[k]) or b"") for k in _CONTEXT_KEYS if k in head), default=0)
    if encoded is None or largest_context > MAX_CONTEXT_BYTES:
        return _check_parts(head, "")
    # A body is the head plus at least one recipient (or the head alone for broadcasts).
    if len(encoded) + len(_RECIPIENTS_KEY) + len(_CLOSE) > MAX_BODY_BYTES:
        return [Violation("trigger", _too_big(MAX_BODY_BYTES), Rule.BODY_TOO_LARGE)]
    return encoded


class BatchPlanner:
    """Closes a batch at 50 recipients, or earlier when the next one would pass 4 MB.

    `index` counts every result a request produces, so a recipient rejected in a stream
    takes an index too (`reserve_index`): indices are unique and follow input order.
    """

    def __init__(self, head_json: bytes) -> None:
        self._prefix = head_json[:-1] + _RECIPIENTS_KEY
        self._base_size = len(self._prefix) + len(_CLOSE)
        self._positions: list[int] = []
        self._parts: list[bytes] = []
        self._size = self._base_size
        self.index = 0

    def encode(self, recipient: Mapping[str, Any], path: str) -> bytes | list[Violation]:
        """One recipient as JSON, or why it cannot be sent (sizes, non-JSON numbers)."""
        encoded = _encode(recipient)
        if encoded is None or len(encoded) > MAX_CONTEXT_BYTES:
            found = _check_parts(recipient, path)
            if found:
                return found
        assert encoded is not None
        if self._base_size + len(encoded) > MAX_BODY_BYTES:
            return [
                Violation(
                    path, "makes the request body larger than 4,000,000 bytes on its own", Rule.BODY_TOO_LARGE
                )
            ]
        return encoded

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

    def flush(self) -> Batch | None:
        """Close the open batch, if it holds anyone."""
        if not self._parts:
            return None
        body = self._prefix + b",".join(self._parts) + _CLOSE
        batch = Batch(index=self.reserve_index(), positions=tuple(self._positions), body=body)
        self._positions = []
        self._parts = []
        self._size = self._base_size
        return batch

    def reserve_index(self) -> int:
        index = self.index
        self.index += 1
        return index


def broadcast_batch(head_json: bytes) -> Batch:
    """A broadcast or audience send is one call, with no recipients key."""
    return Batch(index=0, positions=(), body=head_json, broadcast=True)
