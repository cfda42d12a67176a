"""Protobuf wire bytes in an order the test chooses.

Protobuf leaves the order of map entries on the wire unspecified (grpc-go writes them in random
order, upb in its hash order, seeded per process), and a message's fields may come in any order
too. A request's meaning must not depend on either, so tests send the same message with its map
entries (`google.protobuf.Struct` fields, at any depth) and its fields shuffled. Python's protobuf
picks one order of its own when it serialises, so the bytes are written here by hand. Repeated
fields keep the order of their items: that order is meaning.
"""

from __future__ import annotations

import random

from google.protobuf.message import Message


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def wire(message: Message, order: random.Random) -> bytes:
    """`message` encoded with its fields, and the entries of each of its maps at every depth,
    in the order `order` deals them (Python's protobuf writes one order of its own)."""
    parts: list[bytes] = []
    for field, value in message.ListFields():
        if field.message_type is None:  # scalars, strings, enums: protobuf's own bytes for them
            alone = type(message)()
            if field.is_repeated:
                getattr(alone, field.name).extend(value)
            else:
                setattr(alone, field.name, value)
            parts.append(alone.SerializeToString())
        elif field.message_type.GetOptions().map_entry:
            entries = [delimited(1, key.encode()) + delimited(2, wire(value[key], order)) for key in value]
            order.shuffle(entries)
            parts.append(b"".join(delimited(field.number, entry) for entry in entries))
        elif field.is_repeated:  # items keep their order
            parts.append(b"".join(delimited(field.number, wire(item, order)) for item in value))
        else:
            parts.append(delimited(field.number, wire(value, order)))
    order.shuffle(parts)
    return b"".join(parts)
