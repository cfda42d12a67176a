"""Fuzzing the request messages and the stream protocol through real gRPC (bounded in time).

Whatever a caller sends, it gets OK, INVALID_ARGUMENT or PERMISSION_DENIED, never INTERNAL or
UNKNOWN; every result holds a recipient, no recipient has two results, and an OK call answers
for every recipient it carried. Hypothesis runs in a worker thread with a blocking channel,
while the gateway serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TOKENS, Harness

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text(max_size=12)
    | st.floats(allow_nan=True, allow_infinity=True)  # NaN, infinities and 2^53+ are refused
    | st.integers(2**53, 2**64),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=4,
)
objects = st.dictionaries(st.text(max_size=8), json_values, max_size=3)
words = st.sampled_from(
    ["", "u1", "a@b.co", "not-an-email", "identified", "unidentified", "é\u0000"]
) | st.text(max_size=10)
prioritizations = st.lists(
    st.sampled_from(["identified", "unidentified", "most_recently_updated", "least_recently_updated"])
    | words,
    max_size=3,
)


@st.composite
def recipients(draw: st.DrawFn) -> pb.Recipient:
    recipient = pb.Recipient()
    kind = draw(st.sampled_from(["external_user_id", "email", "user_alias", "none"]))
    if kind == "external_user_id":
        recipient.external_user_id = draw(words)
    elif kind == "email":
        recipient.email = draw(words)
    elif kind == "user_alias":
        recipient.user_alias.alias_name = draw(words)
        recipient.user_alias.alias_label = draw(words)
    recipient.prioritization.extend(draw(prioritizations))
    for name in ("context", "canvas_entry_properties", "attributes"):
        if draw(st.booleans()):
            getattr(recipient, name).update(draw(objects))
    if draw(st.booleans()):
        recipient.send_to_existing_only = draw(st.booleans())
    return recipient


def _audience(depth: int) -> st.SearchStrategy[pb.Audience]:
    leaf = st.builds(
        lambda name, comparison, value: pb.Audience(
            custom_attribute=pb.CustomAttributeFilter(
                custom_attribute_name=name, comparison=comparison, value=_value(value)
            )
        ),
        words,
        st.sampled_from(["equals", "exists", "greater_than", "bogus", ""]),
        json_values,
    ) | st.builds(
        lambda comparison, value: pb.Audience(
            push_subscription_status=pb.SubscriptionStatusFilter(comparison=comparison, value=value)
        ),
        st.sampled_from(["is", "is_not", "x"]),
        st.sampled_from(["opted_in", "subscribed", "unsubscribed", "x"]),
    )
    if depth == 0:
        return leaf
    return leaf | st.builds(
        lambda all_of, any_of: pb.Audience(all_of=all_of, any_of=any_of),
        st.lists(_audience(depth - 1), max_size=2),
        st.lists(_audience(depth - 1), max_size=2),
    )


def _value(item: Any) -> struct_pb2.Value:
    """Any JSON value as a google.protobuf.Value."""
    holder = struct_pb2.Struct()
    holder.update({"v": item})
    return holder.fields["v"]


def rarely(draw: st.DrawFn) -> bool:
    """True one time in four: each hostile feature is drawn this often, so that whole requests
    are valid often enough for the OK path to be fuzzed too."""
    return draw(st.integers(0, 3)) == 0


@st.composite
def triggers(draw: st.DrawFn, max_recipients: int = 120) -> pb.CanvasTrigger:
    trigger = pb.CanvasTrigger(canvas_id=draw(words) if rarely(draw) else "c")
    if rarely(draw):
        name = draw(st.sampled_from(["context", "canvas_entry_properties", "both"]))
        for field in ("context", "canvas_entry_properties"):
            if name in (field, "both"):
                getattr(trigger, field).update(draw(objects))
    if rarely(draw):
        trigger.broadcast = draw(st.booleans())
    if rarely(draw):
        trigger.audience.CopyFrom(draw(_audience(2)))
    count = draw(st.sampled_from([0, 1, 2, 49, 50, 51, max_recipients]))
    simple = [pb.Recipient(external_user_id=f"user-{i}") for i in range(count)]
    fuzzed = draw(st.lists(recipients(), max_size=4)) if rarely(draw) else []
    for recipient in fuzzed:  # a few fuzzed recipients among many plain ones
        simple.insert(draw(st.integers(0, len(simple))), recipient)
    trigger.recipients.extend(simple)
    return trigger


def _mutate(raw: bytes, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(raw)
    for index, byte in flips:
        if data:
            data[index % len(data)] = byte
    return bytes(data)


def _code(error: grpc.RpcError | None) -> grpc.StatusCode:
    return grpc.StatusCode.OK if error is None else error.code()


def _check_results(results: list[pb.BatchResult], carried: int | None) -> None:
    positions = [p for r in results for p in r.positions]
    assert all(r.positions for r in results), "a result without a recipient"
    assert len(positions) == len(set(positions)), "a recipient with two results"
    if carried is not None:
        assert sorted(positions) == list(range(carried)), "an OK call left a recipient without a result"


def _fuzz_send(target: str) -> Counter[str]:
    """Fuzz Send; the status codes seen, by name."""
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(target) as channel:
        send: grpc.UnaryUnaryMultiCallable[bytes, pb.SendResponse] = channel.unary_unary(
            "/canvas_gateway.v1.CanvasGatewayService/Send", response_deserializer=pb.SendResponse.FromString
        )

        @FUZZ
        @given(
            trigger=triggers(),
            validate_only=st.booleans(),
            flips=st.integers(0, 3).flatmap(  # a body with bytes overwritten one time in four
                lambda n: (
                    st.just([])
                    if n
                    else st.lists(
                        st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3
                    )
                )
            ),
        )
        def check(trigger: pb.CanvasTrigger, validate_only: bool, flips: list[tuple[int, int]]) -> None:
            request = pb.SendRequest(trigger=trigger, options=pb.SendOptions(validate_only=validate_only))
            raw = _mutate(request.SerializeToString(), flips)
            reply, error = None, None
            try:
                reply = send(raw, metadata=AUTH, timeout=30)
            except grpc.RpcError as failed:
                error = failed
            seen[_code(error).name] += 1
            assert _code(error) in ALLOWED, (_code(error), error and error.details())
            if reply is None:
                return
            carried = len(pb.SendRequest.FromString(raw).trigger.recipients)
            _check_results(list(reply.results), carried if carried else None)
            assert reply.summary.recipients == sum(len(r.positions) for r in reply.results)

        check()
    return seen


def _fuzz_stream(target: str) -> Counter[str]:
    """Fuzz SendStream; the status codes seen, by name."""
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(target) as channel:
        stream: grpc.StreamStreamMultiCallable[bytes, pb.SendStreamResponse] = channel.stream_stream(
            "/canvas_gateway.v1.CanvasGatewayService/SendStream",
            response_deserializer=pb.SendStreamResponse.FromString,
        )
        header = st.builds(lambda t: pb.SendStreamRequest(header=pb.StreamHeader(trigger=t)), triggers(60))
        chunk = st.builds(
            lambda rs: pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=rs)),
            st.lists(recipients(), max_size=8)
            | st.just([pb.Recipient(external_user_id=f"u{i}") for i in range(60)]),
        )
        anything = (header | chunk).map(pb.SendStreamRequest.SerializeToString) | st.binary(max_size=40)
        # Mostly a header then chunks, so that whole streams are often valid; one message in
        # four is anything at all (a second header, garbage bytes).
        first = st.integers(0, 3).flatmap(
            lambda n: anything if n == 0 else header.map(pb.SendStreamRequest.SerializeToString)
        )
        later = st.integers(0, 3).flatmap(
            lambda n: anything if n == 0 else chunk.map(pb.SendStreamRequest.SerializeToString)
        )

        @FUZZ
        @given(first=first, rest=st.lists(later, max_size=6))
        def check(first: bytes, rest: list[bytes]) -> None:
            messages = [first, *rest]
            results: list[pb.BatchResult] = []
            summary = None
            error = None
            try:
                for response in stream(iter(messages), metadata=AUTH, timeout=30):
                    if response.HasField("result"):
                        results.append(response.result)
                    elif response.HasField("summary"):  # a message with no part is skipped
                        summary = response.summary
            except grpc.RpcError as failed:
                error = failed
            seen[_code(error).name] += 1
            assert _code(error) in ALLOWED, (_code(error), error and error.details())
            if error is not None:
                _check_results(results, None)  # the results before the failure still hold
                return
            assert summary is not None
            carried = sum(
                len(m.header.trigger.recipients) + len(m.chunk.recipients)
                for m in map(pb.SendStreamRequest.FromString, messages)
            )
            _check_results(results, carried)
            assert summary.recipients == carried

        check()
    return seen


@pytest.mark.parametrize("settings_overrides", [{"breaker_failures": 0}])
async def test_any_send_request_gets_a_clean_answer(harness: Harness) -> None:
    async with asyncio.timeout(240):
        seen = await asyncio.to_thread(_fuzz_send, harness.target)
    assert seen["OK"] > 10 and seen["INVALID_ARGUMENT"] > 10, seen  # both paths were exercised


@pytest.mark.parametrize("settings_overrides", [{"breaker_failures": 0}])
async def test_any_stream_gets_a_clean_answer(harness: Harness) -> None:
    async with asyncio.timeout(240):
        seen = await asyncio.to_thread(_fuzz_stream, harness.target)
    assert seen["OK"] > 10 and seen["INVALID_ARGUMENT"] > 10, seen
