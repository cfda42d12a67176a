"""The proto edge: Braze bodies survive proto and come back as the same JSON."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.edge import convert
from canvas_gateway_server.model import Rule
from canvas_gateway_server.validate import encode_head, encode_recipient
from google.protobuf import struct_pb2
from support import EXAMPLES, example, trigger_from_json

REQUESTS = sorted(p.name for p in EXAMPLES.glob("*.json") if not p.name.startswith("response_"))


def as_body(trigger: pb.CanvasTrigger) -> dict[str, Any]:
    body = convert.trigger_head(trigger)
    recipients = [convert.recipient_to_dict(r) for r in trigger.recipients]
    if recipients:
        body["recipients"] = recipients
    return body


def test_every_example_request_is_found() -> None:
    assert len(REQUESTS) == 6


@pytest.mark.parametrize("name", REQUESTS)
def test_example_bodies_round_trip_exactly(name: str) -> None:
    body = example(name)
    assert as_body(trigger_from_json(body)) == body
    # and through the JSON encoder, with integer types intact
    assert orjson.loads(orjson.dumps(as_body(trigger_from_json(body)))) == body


def test_integers_stay_integers_and_fractions_stay_fractions() -> None:
    trigger = pb.CanvasTrigger(canvas_id="c")
    trigger.context.update({"count": 12, "price": 79.99, "big": 2**40, "neg": -3, "nested": {"n": [1, 2.5]}})
    encoded = orjson.dumps(convert.trigger_head(trigger))
    assert b'"count":12' in encoded and b'"count":12.0' not in encoded
    assert b'"big":1099511627776' in encoded
    assert b'"price":79.99' in encoded
    assert b'"nested":{"n":[1,2.5]}' in encoded
    assert b'"neg":-3' in encoded


def test_unset_is_not_false() -> None:
    unset = convert.recipient_to_dict(pb.Recipient(external_user_id="u"))
    explicit = convert.recipient_to_dict(pb.Recipient(external_user_id="u", send_to_existing_only=False))
    assert "send_to_existing_only" not in unset
    assert explicit["send_to_existing_only"] is False
    assert "broadcast" not in convert.trigger_head(pb.CanvasTrigger(canvas_id="c"))
    assert convert.trigger_head(pb.CanvasTrigger(canvas_id="c", broadcast=False))["broadcast"] is False


def test_empty_context_is_forwarded_as_given() -> None:
    trigger = pb.CanvasTrigger(canvas_id="c", context=struct_pb2.Struct())
    assert convert.trigger_head(trigger) == {"canvas_id": "c", "context": {}}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 2.0**53, -(2.0**53), 1234567890123456789])
def test_numbers_json_cannot_carry_are_refused_with_their_field(bad: float) -> None:
    recipient = pb.Recipient(external_user_id="u")
    recipient.context.update({"score": bad})
    _, found = encode_recipient(convert.recipient_to_dict(recipient), "recipients[5]", 20)
    assert [(v.field, v.rule) for v in found] == [("recipients[5].context", Rule.NUMBER_NOT_EXACT)]
    trigger = pb.CanvasTrigger(canvas_id="c")
    trigger.context.update({"score": bad})
    _, head_found = encode_head(convert.trigger_head(trigger))
    assert [v.field for v in head_found] == ["context"]


def test_results_carry_braze_errors_as_json_values() -> None:
    from canvas_gateway_server.model import BatchResult, Code, Outcome

    result = BatchResult(0, (0, 1), Outcome.SENT, Code.OK, errors=("minor", {"code": 7}), http_status=201)
    message = convert.result_to_proto(result)
    assert message.braze.http_status == 201
    assert message.braze.errors[0].string_value == "minor"
    assert message.braze.errors[1].struct_value["code"] == 7
    assert list(message.positions) == [0, 1]
    assert message.outcome == pb.OUTCOME_SENT


def test_a_result_without_a_response_has_no_braze_reply() -> None:
    from canvas_gateway_server.model import BatchResult, Code, Outcome

    result = BatchResult(0, (0,), Outcome.UNKNOWN, Code.UNKNOWN, attempts=1)
    message = convert.result_to_proto(result)
    assert not message.HasField("braze") and message.code == Code.UNKNOWN
