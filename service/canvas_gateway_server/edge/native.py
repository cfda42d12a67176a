"""The compiled recipient path: a `SendStream` chunk's raw bytes straight to each recipient's JSON.

`service/native` (Rust, PyO3, built by maturin with `make install` and in the image) reads the
recipients of one chunk message without making protobuf or Python objects of them, and writes
the canonical JSON that `convert.recipient_to_dict` then `validate.check_and_encode` would
write, byte for byte, keys sorted at every depth. It takes only the common recipient: a
non-empty `external_user_id` with at most one context object whose numbers JSON can carry,
within the size limits. For any other message (a header, an alias or email recipient, a
NOT_JSON number, bytes that do not decode, ...) it answers None and the whole message takes
the Python path, which stays the reference: every rule and every violation comes from it
(tests/test_native.py holds the two equal under hypothesis).

Used when the extension is installed and CGW_NATIVE_RECIPIENTS is true (the default); absent,
every chunk takes the Python path.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

MODULE = "canvas_gateway_native"


class ChunkEncoder(Protocol):
    def __call__(self, raw: bytes, context_name: str, limit: int, /) -> list[bytes] | None:
        """The recipients of a raw `SendStreamRequest` chunk, each as JSON of at most `limit`
        bytes with its context under `context_name`; None to leave the message to Python."""


def load() -> ChunkEncoder | None:
    """The compiled encoder, or None when the extension is not installed."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError:
        return None
    return cast(ChunkEncoder, module.encode_chunk)
