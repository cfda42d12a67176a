"""The compiled recipient path (`edge.native`, service/native) against the Python path, byte for byte.

The Python path (`convert.recipient_to_dict`, then `Intake.take`) is the reference. Wherever the
compiled path answers for a chunk message, Python must decode the same message as a chunk, find
no violation in it, and cut the same bodies; wherever it would not (a violation, bytes that do
not decode, a header), the compiled path must answer None so that Python does. Under hypothesis:
recipients common and not, numbers JSON cannot carry, strings with every escape, map entries in
any order and sent twice, unknown fields, and bytes cut short or changed. Then through real gRPC:
one stream to a gateway with the compiled path and to one without gives Braze the same bodies.

The same for a unary `SendRequest` (`Native.send`): the servicer decodes it with protobuf first
(its head, options, count), so only messages protobuf reads are compared; then real Sends, good
and bad, answer the same and give Braze the same bodies with the compiled path and without.
"""

from __future__ import annotations

import math
import os
import random
import struct
import sys
import types
from pathlib import Path
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.braze import MAX_CONTEXT_BYTES
from canvas_gateway_server.edge import convert, native
from canvas_gateway_server.model import Violation
from canvas_gateway_server.planning import Intake, Taken
from fake_braze import FakeBraze
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Harness, gateway_of, trigger_from_json
from wire import _varint, delimited, wire

NATIVE = native.load()
if NATIVE is None and os.environ.get("CI"):  # `make test` builds it: missing there, it is a failure
    raise RuntimeError("canvas_gateway_native is not installed in CI: `make install` builds it")
pytestmark = pytest.mark.skipif(
    NATIVE is None, reason="canvas_gateway_native is not installed: `make install` builds it"
)
ENCODE = None if NATIVE is None else NATIVE.chunk
SEND = None if NATIVE is None else NATIVE.send
HEAD = {"canvas_id": "c", "context": {"campaign": "spring"}}
NAMES = ("context", "canvas_entry_properties")


def _bodies(intake: Intake, taken: list[Taken]) -> list[bytes]:
    closed = [each.closed for each in taken if each.closed is not None]
    last = intake.finish()
    return [batch.body for batch in [*closed, *([last] if last else [])]]


def python_path(raw: bytes, name: str, head: dict[str, Any]) -> tuple[list[bytes], list[Violation]] | None:
    """The reference: the bodies and violations of a chunk message, None if it is not one."""
    try:
        message = pb.SendStreamRequest.FromString(raw)
    except DecodeError:
        return None
    if message.WhichOneof("part") != "chunk":
        return None
    intake = Intake(head, name)
    taken = [intake.take(convert.recipient_to_dict(r)) for r in message.chunk.recipients]
    return _bodies(intake, taken), [v for each in taken for v in each.violations]


def native_path(raw: bytes, name: str, head: dict[str, Any]) -> list[bytes] | None:
    assert ENCODE is not None
    return compiled_bodies(ENCODE, raw, Intake(head, name))


def compiled_bodies(encoder: native.RecipientEncoder, raw: bytes, intake: Intake) -> list[bytes] | None:
    """The batch bodies `intake` makes of what `encoder` reads from `raw`; None if it leaves it."""
    encoded = encoder(raw, intake.context_name, intake.encoded_limit)
    if encoded is None:
        return None
    closed = [intake.take_encoded(each) for each in encoded]
    last = intake.finish()
    return [batch.body for batch in [*closed, last] if batch is not None]


def same(raw: bytes, name: str = "context", head: dict[str, Any] = HEAD) -> bool:
    """Assert the compiled path agrees with the reference; True if it answered at all."""
    compiled = native_path(raw, name, head)
    if compiled is None:
        return False
    reference = python_path(raw, name, head)
    assert reference is not None, "the compiled path read a message Python refuses"
    bodies, violations = reference
    assert violations == [], "the compiled path let a recipient with violations through"
    assert compiled == bodies
    return True


def chunk_of(*recipients: pb.Recipient) -> bytes:
    return pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients)).SerializeToString()


def recipient(user: str = "u1", **context: Any) -> pb.Recipient:
    out = pb.Recipient(external_user_id=user)
    if context:
        out.context.update(context)
    return out


def chunk_bytes(*recipients: bytes) -> bytes:
    """A chunk message of recipients given as their own (hand-written) bytes."""
    return delimited(2, b"".join(delimited(1, each) for each in recipients))


# --- examples ---------------------------------------------------------------------------------


def test_the_benchmark_recipients_and_many_key_contexts_are_compiled() -> None:
    bench = [recipient(f"user-{i}", order=i) for i in range(120)]
    many = [recipient(f"u{i}", **{f"key{k}": f"v{k}" if k % 2 else k for k in range(12)}) for i in range(60)]
    for recipients in (bench, many):
        for name in NAMES:
            assert same(chunk_of(*recipients), name)


def test_a_context_under_its_legacy_name_goes_out_under_the_tenants_name() -> None:
    legacy = pb.Recipient(external_user_id="u1")
    legacy.canvas_entry_properties.update({"a": 1})
    for name in NAMES:
        assert same(chunk_of(legacy), name)
        bodies = native_path(chunk_of(legacy), name, HEAD)
        assert bodies is not None and f'"recipients":[{{"{name}":{{"a":1}},'.encode() in bodies[0]


@pytest.mark.parametrize(
    "value",
    [
        {"nested": {"b": [1, 2.5, None, True, False, "x", {"z": [], "a": {}}]}},
        {"s": '"\\/\b\f\n\r\t\u0000\u001f\u007f é \u2028 😀'},
        {"n": -0.0, "i": 2**53 - 1, "j": -(2**53) + 1, "f": 1e-7, "g": 1e-5, "h": 123456789012345.6},
        {"tiny": 5e-324, "third": 1 / 3, "e": 2.5e-10, "big": 1.5e15 + 0.5},
        {"": "empty key", "é": 1, "Z": 2, "a": 3, "\u0000": 4},
    ],
)
def test_values_of_every_kind_are_written_as_python_writes_them(value: dict[str, Any]) -> None:
    assert same(chunk_of(recipient("u1", **value)))


def test_an_empty_context_and_no_context_are_compiled() -> None:
    empty = pb.Recipient(external_user_id="u1")
    empty.context.SetInParent()
    assert same(chunk_of(empty, pb.Recipient(external_user_id="u2")))
    assert same(chunk_of())  # a chunk without recipients


@pytest.mark.parametrize(
    "recipients",
    [
        [recipient("")],  # empty identifier: EXTERNAL_USER_ID_EMPTY
        [recipient("u1", n=math.nan)],  # NOT_JSON
        [recipient("u1", n=math.inf)],
        [recipient("u1", n=float(2**53))],
        [recipient("u1", n=-float(2**60))],
        [recipient("u1", big="x" * MAX_CONTEXT_BYTES)],  # CONTEXT_TOO_LARGE
        [pb.Recipient(email="a@b.co", prioritization=["identified"])],  # valid, but not the common one
        [pb.Recipient(user_alias=pb.UserAlias(alias_name="n", alias_label="l"))],
        [pb.Recipient(external_user_id="u1", send_to_existing_only=True)],
        [recipient("u1"), pb.Recipient()],  # no identifier, after one that is fine
    ],
)
def test_recipients_other_than_the_common_one_are_left_to_python(recipients: list[pb.Recipient]) -> None:
    raw = chunk_of(*recipients)
    assert ENCODE is not None and ENCODE(raw, "context", MAX_CONTEXT_BYTES) is None
    assert python_path(raw, "context", HEAD) is not None


def test_both_context_names_on_one_recipient_are_left_to_python() -> None:
    both = recipient("u1", a=1)
    both.canvas_entry_properties.update({"b": 2})
    assert native_path(chunk_of(both), "context", HEAD) is None
    reference = python_path(chunk_of(both), "context", HEAD)
    assert reference is not None
    assert [v.field for v in reference[1]] == ["recipients[0].canvas_entry_properties"]


def test_the_head_size_bounds_what_is_compiled() -> None:
    one = {"custom_attribute": {"custom_attribute_name": "a", "comparison": "equals", "value": 1}}
    big_head = {"canvas_id": "c", "audience": {"OR": [one] * 48_000}}  # 3,984,037 bytes of JSON
    intake = Intake(big_head)
    raw = chunk_of(recipient("u1", text="t" * 20_000))
    assert intake.encoded_limit < 20_000
    assert native_path(raw, "context", big_head) is None
    reference = python_path(raw, "context", big_head)
    assert reference is not None and reference[1] and reference[1][0].rule.name == "BODY_TOO_LARGE"


def test_with_a_bad_head_encoded_recipients_are_counted_and_not_batched() -> None:
    """As `take` does: positions move on, no batch closes while the head has violations."""
    raw = chunk_of(*(recipient(f"u{i}") for i in range(60)))
    bad = {"context": {"a": 1}}  # no canvas_id
    assert native_path(raw, "context", bad) == [] == python_path(raw, "context", bad)[0]  # type: ignore[index]
    intake = Intake(bad)
    assert [intake.take_encoded(b"{}") for _ in range(3)] == [None] * 3 and intake.received == 3


def _entry(key: bytes, value: bytes | None) -> bytes:
    return delimited(1, key) + (b"" if value is None else delimited(2, value))


def _value(**kind: Any) -> bytes:
    return struct_pb2.Value(**kind).SerializeToString()


TWO_NUMBERS = _value(number_value=1) * 2  # a Value with two kinds
UNKNOWN = _varint(99 << 3) + b"\x07"  # field 99, a varint


def test_protobuf_wire_rules_are_kept() -> None:
    """A map key sent twice keeps its last value; a string field sent twice, its last; unknown
    fields (outside map entries) are skipped; an entry without a value is null, without a key is ""."""
    context = b"".join(
        delimited(1, entry)
        for entry in [
            _entry(b"k", _value(number_value=1)),
            _entry(b"k", _value(string_value="last")),
            _entry(b"nothing", None),
            _entry(b"", _value(bool_value=True)),
            _entry(b"u", _value(number_value=2) + delimited(99, b"unknown")),
            _entry(b"w", _value(null_value=0)),
            _entry(b"l", delimited(6, delimited(1, _value(number_value=3)) + UNKNOWN)),  # in a ListValue
        ]
    )
    unknown = _varint(12 << 3) + b"\x01"
    user = delimited(1, b"first") + delimited(5, context + UNKNOWN) + delimited(1, b"second") + unknown
    raw = chunk_bytes(user) + delimited(7, b"unknown at the top")
    assert same(raw)
    bodies = native_path(raw, "context", HEAD)
    assert bodies is not None
    assert b'{"context":{"":true,"k":"last","l":[3],"nothing":null,"u":2,"w":null},' in bodies[0]
    assert b'"external_user_id":"second"' in bodies[0]


@pytest.mark.parametrize(
    "raw",
    [
        pb.SendStreamRequest(header=pb.StreamHeader()).SerializeToString(),  # a header
        b"",  # neither part
        chunk_bytes(delimited(1, b"\xff\xfe")),  # not UTF-8
        chunk_bytes(delimited(1, b"u") + delimited(5, delimited(1, _entry(b"\xc3", None)))),
        chunk_bytes(delimited(1, b"u"))[:-1],  # cut short
        chunk_bytes(delimited(1, b"u") + b"\x0b\x0c"),  # a group
        chunk_bytes(delimited(1, b"u") + delimited(5, b"") + delimited(5, b"")),  # merged by protobuf
        chunk_bytes(delimited(1, b"u") + delimited(5, delimited(1, _entry(b"k", TWO_NUMBERS)))),
        delimited(2, b"") * 2,  # the chunk sent twice: merged
        # an unknown field in a map entry: upb drops the entry from the map
        chunk_bytes(delimited(1, b"u") + delimited(5, delimited(1, _entry(b"w", None) + UNKNOWN))),
        chunk_bytes(_varint(1 << 3) + _varint(5)),  # an identifier of the wrong wire type
    ],
)
def test_messages_protobuf_would_read_otherwise_are_left_to_python(raw: bytes) -> None:
    assert native_path(raw, "context", HEAD) is None


def _nested(levels: int, inner: Any = 1, *, as_list: bool = False) -> bytes:
    value = inner
    for _ in range(levels):
        value = [value] if as_list else {"d": value}
    return chunk_bytes(recipient("u1", deep=value).SerializeToString())


def test_deep_nesting_is_left_to_python() -> None:
    """Past 16 levels the compiled path declines, far below upb's limit (which refuses 40)."""
    assert python_path(_nested(40), "context", HEAD) is None  # upb refuses it
    for as_list in (False, True):
        assert native_path(_nested(16, as_list=as_list), "context", HEAD) is None
        assert python_path(_nested(16, as_list=as_list), "context", HEAD) is not None
        assert same(_nested(14, as_list=as_list))


def test_every_double_is_written_as_orjson_writes_it() -> None:
    """Random bit patterns: every double below 2^53 is one body, with the same digits."""
    draw = random.Random(7)
    numbers = [struct.unpack("<d", draw.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(20_000)]
    numbers += [draw.uniform(-1e6, 1e6) for _ in range(5_000)] + [10.0**e * 1.5 for e in range(-30, 16)]
    fine = [n for n in numbers if math.isfinite(n) and abs(n) < 2**53]
    raw = chunk_of(*(recipient(f"u{i}", x=n) for i, n in enumerate(fine)))
    assert same(raw)


# --- under hypothesis ---------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
_NUMBERS = st.floats() | st.integers(-(2**60), 2**60) | st.sampled_from([2**53, -(2**53), 2**53 - 1, -0.0])
_JSON = st.recursive(
    st.none() | st.booleans() | _NUMBERS | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)


def damaged(raw: bytes, damage: str, order: random.Random) -> bytes:
    """`raw` cut at a random byte ("cut"), with one random bit flipped ("flip"), or whole ("none")."""
    if raw and damage == "cut":
        return raw[: order.randrange(len(raw))]
    if raw and damage == "flip":
        at = order.randrange(len(raw))
        return raw[:at] + bytes([raw[at] ^ (1 << order.randrange(8))]) + raw[at + 1 :]
    return raw


@st.composite
def recipients(draw: st.DrawFn) -> pb.Recipient:
    """Mostly the common recipient (any identifier, any context); at times any other."""
    out = pb.Recipient()
    out.external_user_id = draw(st.sampled_from(["u1", ""]) | _TEXT)
    name = draw(st.sampled_from([*NAMES, None]))
    if name is not None:
        getattr(out, name).update(draw(st.dictionaries(_TEXT, _JSON, max_size=6)))
    if draw(st.integers(0, 9)) == 0:
        extra = draw(st.sampled_from(["email", "alias", "both names", "attributes", "existing"]))
        if extra == "email":
            out.email = "a@b.co"
            out.prioritization.append("identified")
        elif extra == "alias":
            out.user_alias.alias_name = "n"
        elif extra == "both names":
            out.context.update({"a": 1})
            out.canvas_entry_properties.update({"b": 2})
        elif extra == "attributes":
            out.attributes.update({"a": 1})
        else:
            out.send_to_existing_only = False
    return out


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    chosen=st.lists(recipients(), max_size=6),
    seed=st.integers(),
    name=st.sampled_from(NAMES),
    damage=st.sampled_from(["none", "none", "none", "cut", "flip"]),
)
def test_the_compiled_path_agrees_with_python(
    chosen: list[pb.Recipient], seed: int, name: str, damage: str
) -> None:
    order = random.Random(seed)
    message = pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=chosen))
    raw = damaged(wire(message, order), damage, order)
    answered = same(raw, name)
    reference = python_path(raw, name, HEAD)
    if damage == "none" and reference is not None and not reference[1]:
        # Python finds nothing wrong: the compiled path answers unless a message field came
        # twice (protobuf merges them) or a recipient is not the common one.
        common = all(r.WhichOneof("identifier") == "external_user_id" for r in chosen) and not any(
            r.HasField("attributes") or r.HasField("send_to_existing_only") for r in chosen
        )
        assert answered or not common


# --- unary Send: the trigger's recipients ---------------------------------------------------------


def python_send(raw: bytes, name: str) -> tuple[list[bytes], list[Violation]] | None:
    """The reference for a unary request: its bodies and violations, None if it does not decode."""
    try:
        message = pb.SendRequest.FromString(raw)
    except DecodeError:
        return None
    intake = Intake(convert.trigger_head(message.trigger), name)
    taken = [intake.take(convert.recipient_to_dict(r)) for r in message.trigger.recipients]
    return _bodies(intake, taken), [v for each in taken for v in each.violations]


def native_send(raw: bytes, name: str) -> list[bytes] | None:
    """As the servicer: protobuf decodes the request (head, options) first, then the compiled path
    reads the recipients from the same bytes."""
    assert SEND is not None
    head = convert.trigger_head(pb.SendRequest.FromString(raw).trigger)
    return compiled_bodies(SEND, raw, Intake(head, name))


def same_send(raw: bytes, name: str = "context") -> bool:
    """Assert the compiled path agrees with the reference on a unary request; True if it answered."""
    reference = python_send(raw, name)
    if reference is None:
        return False  # protobuf refuses it: the servicer answers before the compiled path is asked
    compiled = native_send(raw, name)
    if compiled is None:
        return False
    bodies, violations = reference
    assert violations == [], "the compiled path let a recipient with violations through"
    assert compiled == bodies
    return True


def send_of(*recipients: pb.Recipient, **head: Any) -> bytes:
    trigger = trigger_from_json({"canvas_id": "c", "context": {"campaign": "spring"}, **head})
    trigger.recipients.extend(recipients)
    options = pb.SendOptions(idempotency_key="k-1", priority=pb.PRIORITY_BULK)
    return pb.SendRequest(options=options, trigger=trigger).SerializeToString()


def test_a_unary_send_of_common_recipients_is_compiled() -> None:
    bench = [recipient(f"user-{i}", order=i) for i in range(50)]
    many = [recipient(f"u{i}", **{f"key{k}": f"v{k}" if k % 2 else k for k in range(12)}) for i in range(120)]
    legacy = pb.Recipient(external_user_id="u1")
    legacy.canvas_entry_properties.update({"a": [1, {"b": None}]})
    for recipients in (bench, many, [legacy, recipient("u2")], []):
        for name in NAMES:
            assert same_send(send_of(*recipients), name)
    bodies = native_send(send_of(legacy), "canvas_entry_properties")
    assert bodies == [
        b'{"canvas_entry_properties":{"campaign":"spring"},"canvas_id":"c",'
        b'"recipients":[{"canvas_entry_properties":{"a":[1,{"b":null}]},"external_user_id":"u1"}]}'
    ]


def test_the_triggers_other_fields_anywhere_around_its_recipients_are_skipped() -> None:
    """Protobuf may write the fields of a message in any order: a trigger's canvas_id, context,
    audience and broadcast may come between its recipients, and the options before the trigger."""
    attribute = {"custom_attribute_name": "a", "comparison": "equals", "value": 1}
    tree = {"AND": [{"custom_attribute": attribute}]}
    head = trigger_from_json({"canvas_id": "c", "context": {"a": 1}, "broadcast": False, "audience": tree})
    people = [recipient(f"u{i}", i=i).SerializeToString() for i in range(3)]
    fields = [
        delimited(1, b"c"),
        delimited(2, head.context.SerializeToString()),
        delimited(5, head.audience.SerializeToString()),
        _varint(4 << 3) + b"\x00",  # broadcast: false
        UNKNOWN,
    ]
    trigger = b"".join(
        [fields[0], delimited(6, people[0]), fields[1], fields[2], delimited(6, people[1]), *fields[3:]]
    )
    trigger += delimited(6, people[2])
    options = delimited(2, pb.SendOptions(validate_only=True).SerializeToString())
    raw = options + delimited(1, trigger) + delimited(9, b"unknown at the top")
    assert same_send(raw)
    compiled = native_send(raw, "context")
    assert compiled is not None and b'"external_user_id":"u2"}]}' in compiled[0]


def test_a_send_with_one_bad_recipient_is_left_to_python_which_names_it() -> None:
    people = [recipient(f"u{i}") for i in range(5)]
    people[3] = recipient("u3", n=math.nan)
    raw = send_of(*people)
    assert native_send(raw, "context") is None
    reference = python_send(raw, "context")
    assert reference is not None and [v.field for v in reference[1]] == ["recipients[3].context"]


def test_the_head_of_a_send_bounds_what_is_compiled() -> None:
    """The limit is the one Intake gives for this request's own head."""
    one = {"custom_attribute": {"custom_attribute_name": "a", "comparison": "equals", "value": 1}}
    audience = {"OR": [one] * 48_000}  # 3,984,037 bytes of JSON in the head
    raw = send_of(recipient("u1", text="t" * 20_000), audience=audience)
    assert native_send(raw, "context") is None
    reference = python_send(raw, "context")
    assert reference is not None and [v.rule.name for v in reference[1]] == ["BODY_TOO_LARGE"]
    assert same_send(send_of(recipient("u1", text="t" * 100), audience=audience))


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # no trigger
        pb.SendRequest(options=pb.SendOptions(validate_only=True)).SerializeToString(),
        delimited(1, b"") * 2,  # the trigger sent twice: merged
        delimited(1, delimited(6, delimited(1, b"u"))) + delimited(1, delimited(6, delimited(1, b"v"))),
        delimited(1, _varint(6 << 3) + _varint(5)),  # a recipient of the wrong wire type
        delimited(1, delimited(6, delimited(1, b"u")) + b"\x0b\x0c"),  # a group in the trigger
        _varint(1 << 3) + _varint(1),  # the trigger of the wrong wire type
    ],
)
def test_sends_protobuf_would_read_otherwise_are_left_to_python(raw: bytes) -> None:
    assert SEND is not None and SEND(raw, "context", MAX_CONTEXT_BYTES) is None


@st.composite
def send_requests(draw: st.DrawFn) -> pb.SendRequest:
    """A unary request: any head (or none), options, and recipients as the chunks have them."""
    request = pb.SendRequest()
    trigger = request.trigger
    trigger.canvas_id = draw(st.sampled_from(["c", ""]))
    name = draw(st.sampled_from([*NAMES, None]))
    if name is not None:
        getattr(trigger, name).update(draw(st.dictionaries(_TEXT, _JSON, max_size=4)))
    if draw(st.booleans()):
        trigger.broadcast = draw(st.booleans())
    trigger.recipients.extend(draw(st.lists(recipients(), max_size=6)))
    if draw(st.booleans()):
        request.options.idempotency_key = draw(st.sampled_from(["k-1", "bad key"]))
        request.options.validate_only = draw(st.booleans())
    return request


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    request=send_requests(),
    seed=st.integers(),
    name=st.sampled_from(NAMES),
    damage=st.sampled_from(["none", "none", "none", "cut", "flip"]),
)
def test_the_compiled_path_agrees_with_python_on_unary_sends(
    request: pb.SendRequest, seed: int, name: str, damage: str
) -> None:
    order = random.Random(seed)
    raw = damaged(wire(request, order), damage, order)
    answered = same_send(raw, name)
    reference = python_send(raw, name)
    if damage == "none" and reference is not None and not reference[1]:
        chosen = request.trigger.recipients
        common = all(r.WhichOneof("identifier") == "external_user_id" for r in chosen) and not any(
            r.HasField("attributes") or r.HasField("send_to_existing_only") for r in chosen
        )
        assert answered or not common or not request.HasField("trigger")


# --- through real gRPC --------------------------------------------------------------------------


async def _bodies_sent(
    stub: pb_grpc.CanvasGatewayServiceAsyncStub, fake: FakeBraze, messages: list[Any]
) -> list[bytes]:
    before = len(fake.calls)

    async def requests() -> Any:
        for message in messages:
            yield message

    results = [r async for r in stub.SendStream(requests(), metadata=Harness.auth(), timeout=60)]
    assert results[-1].HasField("summary")
    return sorted(call.raw for call in fake.calls[before:])


async def test_one_stream_gives_braze_the_same_bodies_with_and_without_the_compiled_path(
    harness: Harness, tmp_path: Path
) -> None:
    header = pb.SendStreamRequest(
        header=pb.StreamHeader(trigger=trigger_from_json({"canvas_id": "c", "context": {"a": 1}}))
    )
    people = [
        {"external_user_id": f"user-{i}", "context": {"i": i, "tags": ["x", i / 7], "z": {"b": 1, "a": None}}}
        for i in range(230)
    ]
    people[7] = {"email": "no-prioritization@example.com"}  # a violation: its chunk goes through Python
    chunks = [
        pb.SendStreamRequest(
            chunk=pb.RecipientChunk(
                recipients=trigger_from_json({"canvas_id": "x", "recipients": people[i : i + 60]}).recipients
            )
        )
        for i in range(0, len(people), 60)
    ]
    compiled = await _bodies_sent(harness.stub, harness.fake, [header, *chunks])
    python = await gateway_of(harness.fake, tmp_path, native_recipients=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{python.port}") as channel:
            stub = pb_grpc.CanvasGatewayServiceStub(channel)
            reference = await _bodies_sent(stub, harness.fake, [header, *chunks])
    finally:
        await python.stop(grace=0)
    assert len(compiled) == 5 and compiled == reference


def test_load_is_none_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, native.MODULE, None)  # what an interpreter without it finds
    assert native.load() is None


def test_load_is_none_with_a_build_older_than_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension built before `encode_send` existed: every recipient takes the Python path."""
    old = types.ModuleType(native.MODULE)
    old.encode_chunk = ENCODE  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, native.MODULE, old)
    assert native.load() is None
    old.encode_send = SEND  # type: ignore[attr-defined]
    assert native.load() == (ENCODE, SEND)


def _sends() -> list[pb.SendRequest]:
    """Unary requests good and bad: every one answered the same with the compiled path and without."""
    people = [
        {"external_user_id": f"user-{i}", "context": {"i": i, "tags": ["x", i / 7], "z": {"b": 1, "a": None}}}
        for i in range(120)
    ]
    legacy = [{"external_user_id": f"l-{i}", "canvas_entry_properties": {"i": i}} for i in range(3)]
    one_bad = [*people[:10], {"email": "no-prioritization@example.com"}, *people[10:20]]
    bodies: list[dict[str, Any]] = [
        {"canvas_id": "c", "context": {"a": 1}, "recipients": people},  # three batches
        {"canvas_id": "c", "canvas_entry_properties": {"a": 1}, "recipients": legacy},
        {"canvas_id": "c", "recipients": one_bad},  # a violation: the whole request through Python
        {"context": {"a": 1}, "recipients": people[:5]},  # a head violation: recipients compiled
        {"canvas_id": "c", "broadcast": True, "recipients": people[:5]},  # a count violation
    ]
    requests = [pb.SendRequest(trigger=trigger_from_json(body)) for body in bodies]
    for options in (pb.SendOptions(validate_only=True), pb.SendOptions(idempotency_key="a b")):
        requests.append(pb.SendRequest(trigger=requests[1].trigger, options=options))
    return requests


async def _answers(
    stub: pb_grpc.CanvasGatewayServiceAsyncStub, fake: FakeBraze, requests: list[pb.SendRequest]
) -> list[tuple[Any, ...]]:
    """Each request's answer (its response, ids cleared; or its status, message and details
    trailer) and the bodies Braze got for it."""
    found: list[tuple[Any, ...]] = []
    for request in requests:
        before = len(fake.calls)
        try:
            response = await stub.Send(request, metadata=Harness.auth(), timeout=60)
        except grpc.aio.AioRpcError as error:
            trailer = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
            answer: tuple[Any, ...] = (error.code(), error.details(), trailer)
        else:
            response.summary.request_id = ""
            for result in response.results:
                result.braze.dispatch_id = ""
            answer = (response,)
        found.append((*answer, sorted(call.raw for call in fake.calls[before:])))
    return found


async def test_unary_sends_answer_the_same_with_and_without_the_compiled_path(
    harness: Harness, tmp_path: Path
) -> None:
    requests = _sends()
    compiled = await _answers(harness.stub, harness.fake, requests)
    python = await gateway_of(harness.fake, tmp_path, native_recipients=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{python.port}") as channel:
            reference = await _answers(pb_grpc.CanvasGatewayServiceStub(channel), harness.fake, requests)
    finally:
        await python.stop(grace=0)
    assert compiled == reference
    assert [len(answer[-1]) for answer in compiled] == [3, 1, 0, 0, 0, 0, 0]
    assert [answer[0] for answer in compiled[2:5]] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert [v.field for v in _violations(compiled[2][2])] == ["recipients[10].prioritization"]
    assert [v.field for v in _violations(compiled[3][2])] == ["canvas_id"]


def _violations(trailer: bytes) -> list[Any]:
    from google.rpc import error_details_pb2, status_pb2

    bad = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(trailer).details[0].Unpack(bad)
    return list(bad.field_violations)
