"""The compiled recipient path: a request's raw bytes straight to each recipient's JSON.

`service/native` (Rust, PyO3, built by maturin with `make install` and in the image) reads the
recipients of one `SendStream` chunk message (`Native.chunk`) or of one unary `SendRequest`'s
trigger (`Native.send`) without making protobuf or Python objects of them, and writes the
canonical JSON that `convert.recipient_to_dict` then `validate.check_and_encode` would write,
byte for byte, keys sorted at every depth. Both share one recipient writer. It takes only the
common recipient: a non-empty `external_user_id` with at most one context object whose numbers
JSON can carry, within the size limits. For any other message (a header, an alias or email
recipient, a NOT_JSON number, bytes that do not decode, ...) it answers None and the whole
message takes the Python path, which stays the reference: every rule and every violation comes
from it (tests/test_native.py holds the two equal under hypothesis).

A unary Send is still decoded by protobuf first, for its head and options (and for the count
check before any recipient is read); the compiled path then reads its recipients once more from
the raw bytes, in place of making a dict of each. upb's share of that decode is small beside the
dicts it spares (microseconds for 50 recipients), so no second way of reading the head exists.

Used when the extension is installed and CGW_NATIVE_RECIPIENTS is true (the default); absent,
every chunk and every Send takes the Python path.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Protocol, cast

MODULE = "canvas_gateway_native"


class RecipientEncoder(Protocol):
    def __call__(self, raw: bytes, context_name: str, limit: int, /) -> list[bytes] | None:
        """The recipients of a raw message, each as JSON of at most `limit` bytes with its
        context under `context_name`; None to leave the message to Python."""


class Native(NamedTuple):
    """The compiled encoders, one per message that carries recipients."""

    chunk: RecipientEncoder
    """A `SendStreamRequest` chunk (a header: None)."""
    send: RecipientEncoder
    """A unary `SendRequest`: its trigger's recipients."""


def load() -> Native | None:
    """The compiled encoders, or None when the extension is not installed (or is a build older
    than this code, without one of them: `make install` builds it again)."""
    try:
        module = importlib.import_module(MODULE)
        return Native(cast(RecipientEncoder, module.encode_chunk), cast(RecipientEncoder, module.encode_send))
    except (ImportError, AttributeError):
        return None
