"""Protobuf wire bytes with map entries in an order the test chooses.

Protobuf leaves the order of map entries on the wire unspecified: grpc-go writes them in random
order, upb in its hash order (seeded per process). A request's meaning must not depend on it, so
tests send the same message with its map entries (`google.protobuf.Struct` fields, at any depth)
shuffled. Python's protobuf picks its own order when it serialises, so the bytes are written here:
each map entry as a length-delimited field, in `order`'s order, recursively; every other field as
protobuf writes it. Fields keep their numeric order and repeated fields their order: only map
entries move.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

T = TypeVar("T")
Order = Callable[[list[T]], list[T]]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def encode(message: Message, order: Order[Any]) -> bytes:
    """`message`'s wire bytes, each map's entries in the order `order` gives them."""
    out = bytearray()
    for field, value in message.ListFields():
        if _is_map(field):
            entry_type = type(getattr(message, field.name).GetEntryClass()(key=next(iter(value))))
            value_type = entry_type.DESCRIPTOR.fields_by_name["value"].message_type
            for key in order(list(value)):
                entry = entry_type(key=key)
                if value_type is not None:
                    entry.value.CopyFrom(value[key])
                else:
                    entry.value = value[key]
                out += _delimited(field.number, encode(entry, order))
        elif field.message_type is not None:
            items: Sequence[Message] = value if field.is_repeated else [value]
            for item in items:
                out += _delimited(field.number, encode(item, order))
        else:
            alone = type(message)()
            if field.is_repeated:
                getattr(alone, field.name).extend(value)
            else:
                setattr(alone, field.name, value)
            out += alone.SerializeToString()
    return bytes(out)


def shuffled(rng: random.Random) -> Order[Any]:
    """An order that shuffles each map's entries with `rng`."""

    def order(keys: list[Any]) -> list[Any]:
        keys = list(keys)
        rng.shuffle(keys)
        return keys

    return order


def reversed_order(keys: list[Any]) -> list[Any]:
    return list(reversed(keys))
