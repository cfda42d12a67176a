"""An idempotency key's digest is a function of the request's meaning, not of its encoding.

Protobuf leaves the order of map entries on the wire to the encoder (grpc-go writes them in
random order), and upb iterates a decoded map in an order that depends on the order the entries
came in and on a hash seeded per process. Every google.protobuf.Struct of the contract is such a
map: the trigger's and each recipient's context (under either name), a recipient's attributes,
and every Struct nested in them, directly or in a list (an audience filter's `value` is a Value
that may not hold one: refused). Here the same request is encoded by hand with the entries of
every map (and the fields of every message) in another order, decoded as the servicer decodes
it, and cut into batches: every encoding must give the same bodies and the same digests. Across
processes: two gateway processes on one Redis, a keyed request sent to one and sent again, its
maps in another order, to the other, is replayed and Braze is not called.
"""

from __future__ import annotations

import math
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.edge import convert
from canvas_gateway_server.keeping import digest
from canvas_gateway_server.planning import Intake
from fake_braze import FakeBraze
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import RedisServer, Replica, redis_server, start_replica, stop_process
from support import FAKE_URLS, TOKENS, check_sent_once, tenants_toml
from wire import delimited, wire

# --- requests -------------------------------------------------------------------------------

_KEYS = st.text(st.characters(codec="utf-8"), max_size=6)  # protobuf strings are UTF-8
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(-(2.0**53) + 1, 2.0**53 - 1)  # past 2^53 a number is refused (convert.py)
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=25,
)
_OBJECTS = st.dictionaries(_KEYS, _JSON, min_size=1, max_size=14)
"""A Struct: up to 14 keys, holding Structs and lists of Structs in turn."""


def _struct(fields: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(fields)
    return struct


@st.composite
def _recipient_parts(draw: st.DrawFn) -> pb.Recipient:
    """A recipient's maps: a context (under either name, or none), perhaps attributes."""
    recipient = pb.Recipient()
    name = draw(st.sampled_from(["context", "canvas_entry_properties", None]))
    if name is not None:
        getattr(recipient, name).CopyFrom(_struct(draw(_OBJECTS)))
    if draw(st.booleans()):
        recipient.attributes.CopyFrom(_struct(draw(_OBJECTS)))
        recipient.send_to_existing_only = draw(st.booleans())
    return recipient


@st.composite
def requests(draw: st.DrawFn) -> pb.SendRequest:
    """A keyed request: a context (under either name) and up to two batches of recipients,
    each with the maps of one of up to three drawn shapes (drawing 60 apart is slow)."""
    trigger = pb.CanvasTrigger(canvas_id="c")
    name = draw(st.sampled_from(["context", "canvas_entry_properties"]))
    getattr(trigger, name).CopyFrom(_struct(draw(_OBJECTS)))
    shapes = draw(st.lists(_recipient_parts(), min_size=1, max_size=3))
    for index in range(draw(st.integers(1, 60))):
        recipient = trigger.recipients.add()
        recipient.CopyFrom(shapes[index % len(shapes)])
        recipient.external_user_id = f"u{index}"
    return pb.SendRequest(trigger=trigger, options=pb.SendOptions(idempotency_key="k"))


def batches(raw: bytes, context_name: str = "context") -> list[tuple[bytes, str]]:
    """The bodies and digests of a Send request's batches, decoded as the servicer decodes it."""
    trigger = pb.SendRequest.FromString(raw).trigger
    intake = Intake(convert.trigger_head(trigger), context_name)
    cut = [intake.take(convert.recipient_to_dict(r)) for r in trigger.recipients]
    assert not intake.head_violations and not any(taken.violations for taken in cut)
    closed = [taken.closed for taken in cut if taken.closed is not None]
    last = intake.finish()
    return [(batch.body, digest(batch)) for batch in [*closed, *([last] if last else [])]]


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow],
)
@given(request=requests(), seeds=st.lists(st.integers(), min_size=2, max_size=4), legacy=st.booleans())
def test_map_entries_in_any_order_at_any_depth_give_one_body_and_one_digest(
    request: pb.SendRequest, seeds: list[int], legacy: bool
) -> None:
    name = "canvas_entry_properties" if legacy else "context"  # the tenant's name for it
    encodings = [request.SerializeToString(), *(wire(request, random.Random(seed)) for seed in seeds)]
    for raw in encodings:
        assert pb.SendRequest.FromString(raw) == request  # the same request, however encoded
    expected = batches(encodings[0], name)
    assert len(expected) == math.ceil(len(request.trigger.recipients) / 50)
    for raw in encodings[1:]:
        assert batches(raw, name) == expected


def test_a_many_key_context_in_two_orders_is_one_body() -> None:
    """The issue's case, as a plain example: a 12-key context, its entries reversed."""
    fields = {f"key{i}": i for i in range(12)}
    request = pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", context=_struct(fields)))
    request.trigger.recipients.add(external_user_id="u0")
    entries = [_entry(key, number) for key, number in fields.items()]
    forward, backward = (
        delimited(2, b"".join(delimited(1, e) for e in order)) for order in (entries, entries[::-1])
    )
    rest = pb.CanvasTrigger(canvas_id="c", recipients=request.trigger.recipients).SerializeToString()
    one, other = (delimited(1, rest + context) for context in (forward, backward))
    assert pb.SendRequest.FromString(one) == pb.SendRequest.FromString(other) == request
    assert batches(one) == batches(other)
    assert batches(one)[0][0].startswith(b'{"canvas_id":"c","context":{"key0":0,"key1":1,"key10":10,')


def _entry(key: str, number: int) -> bytes:
    return delimited(1, key.encode()) + delimited(
        2, struct_pb2.Value(number_value=number).SerializeToString()
    )


# --- two processes, one Redis ---------------------------------------------------------------

AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)


@pytest.fixture
async def pair(fake: FakeBraze, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    """Two gateway processes sharing keys through one Redis (each hashes maps its own way)."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    async with redis_server() as redis, aiohttp.ClientSession() as session:
        replicas = [await _start(tenants, session, redis) for _ in range(2)]
        try:
            yield replicas
        finally:
            for replica in replicas:
                await stop_process(replica.process, signal.SIGKILL)


async def _start(tenants: Path, session: aiohttp.ClientSession, redis: RedisServer) -> Replica:
    return await start_replica(tenants, session, CGW_REDIS_URL=redis.url, CGW_SHUTDOWN_DELAY_SECONDS="0")


async def _send(replica: Replica, raw: bytes) -> pb.SendResponse:
    async with grpc.aio.insecure_channel(replica.address) as channel:
        send = channel.unary_unary(
            "/canvas_gateway.v1.CanvasGatewayService/Send",
            request_serializer=lambda raw: raw,  # the bytes as encoded here, map order and all
            response_deserializer=pb.SendResponse.FromString,
        )
        response: pb.SendResponse = await send(raw, metadata=AUTH, timeout=30)
        return response


async def test_a_resend_with_its_maps_in_another_order_to_another_process_is_replayed(
    pair: list[Replica], fake: FakeBraze
) -> None:
    context = {
        f"key{i}": {"n": i, "tags": [{"a": i, "b": str(i)}, {"c": True, "d": None}]} for i in range(12)
    }
    request = pb.SendRequest(
        trigger=pb.CanvasTrigger(canvas_id="c", context=_struct(context)),
        options=pb.SendOptions(idempotency_key="resend-elsewhere"),
    )
    for i in range(120):
        request.trigger.recipients.add(external_user_id=f"u{i}").context.update(
            {f"field{k}": k * i for k in range(12)}
        )
    first = await _send(pair[0], wire(request, random.Random(1)))
    assert [(r.outcome, r.replayed) for r in first.results] == [(pb.OUTCOME_SENT, False)] * 3
    calls = len(fake.calls)
    # The same bytes to the other process (its upb hashes maps its own way), then other orders.
    for seed, replica in [(1, pair[1]), (2, pair[1]), (3, pair[0])]:
        again = await _send(replica, wire(request, random.Random(seed)))
        assert [(r.outcome, r.replayed) for r in again.results] == [(pb.OUTCOME_SENT, True)] * 3, [
            r.status_message for r in again.results
        ]
        assert [r.braze.dispatch_id for r in again.results] == [r.braze.dispatch_id for r in first.results]
    assert len(fake.calls) == calls == 3
    check_sent_once(first.results, fake)
    # What Braze received is canonical too: keys sorted at every depth.
    body = fake.calls[0].body
    assert list(body) == ["canvas_id", "context", "recipients"]
    assert list(body["context"]) == sorted(context)
    assert list(body["recipients"][0]["context"]) == sorted(f"field{k}" for k in range(12))
