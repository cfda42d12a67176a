"""Batch planning: at most 50 recipients and 4 MB per body, caller order, exact JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from canvas_gateway_server.braze import MAX_BODY_BYTES, MAX_CONTEXT_BYTES
from canvas_gateway_server.model import Batch
from canvas_gateway_server.planning import Intake
from canvas_gateway_server.validate import encode_head, encode_recipient


def plan(
    head: Mapping[str, Any], recipients: Sequence[Mapping[str, Any]], context_name: str = "context"
) -> list[Batch]:
    intake = Intake(head, context_name)
    assert intake.head_violations == ()
    batches = []
    for recipient in recipients:
        taken = intake.take(recipient)
        assert taken.violations == ()
        if taken.closed:
            batches.append(taken.closed)
    last = intake.finish()
    if last:
        batches.append(last)
    return batches


def fields(found: tuple[bytes, list[Any]]) -> list[str]:
    encoded, violations = found
    assert (encoded == b"") == bool(violations)
    return [v.field for v in violations]


def test_batches_hold_at_most_50_in_order_and_bodies_are_the_request_restricted() -> None:
    head = {"canvas_id": "c", "context": {"n": 12, "price": 9.5}}
    recipients = [{"external_user_id": f"u{i}"} for i in range(120)]
    batches = plan(head, recipients)
    assert [len(b.positions) for b in batches] == [50, 50, 20]
    assert [b.index for b in batches] == [0, 1, 2]
    assert [p for b in batches for p in b.positions] == list(range(120))
    for batch in batches:
        body = orjson.loads(batch.body)
        assert body == {**head, "recipients": [recipients[p] for p in batch.positions]}
    assert b'"n":12,' in batches[0].body  # integers stay integers


def test_a_batch_closes_early_rather_than_pass_4_mb() -> None:
    blob = "x" * 90_000  # 50 of these would pass 4 MB
    recipients = [{"external_user_id": f"u{i}", "attributes": {"bio": blob}} for i in range(120)]
    batches = plan({"canvas_id": "c"}, recipients)
    assert all(len(b.body) <= MAX_BODY_BYTES for b in batches)
    assert all(len(b.positions) <= 50 for b in batches)
    assert len(batches[0].positions) < 50
    assert [p for b in batches for p in b.positions] == list(range(120))


def test_oversized_context_is_named() -> None:
    recipient = {"external_user_id": "u", "context": {"k": "x" * MAX_CONTEXT_BYTES}}
    assert fields(encode_recipient(recipient, "recipients[2]", 20)) == ["recipients[2].context"]
    assert fields(encode_head({"canvas_id": "c", "context": {"k": "x" * MAX_CONTEXT_BYTES}})) == ["context"]


def test_context_just_under_the_limit_is_accepted() -> None:
    value = "x" * (MAX_CONTEXT_BYTES - len(b'{"k":""}'))
    assert len(orjson.dumps({"k": value})) == MAX_CONTEXT_BYTES
    assert fields(encode_head({"canvas_id": "c", "context": {"k": value}})) == []


def test_a_recipient_too_big_for_any_body_is_refused() -> None:
    recipient = {"external_user_id": "u", "attributes": {"a": "x" * MAX_BODY_BYTES}}
    assert fields(encode_recipient(recipient, "recipients[0]", 20)) == ["recipients[0]"]


def test_a_recipient_that_exactly_fills_a_body_alone_is_accepted() -> None:
    head: Mapping[str, Any] = {"canvas_id": "c"}
    head_json = encode_head(head)[0]
    frame = len(head_json) + len(b',"recipients":[]}') - 1
    filler = MAX_BODY_BYTES - frame - len(b'{"external_user_id":"u","attributes":{"a":""}}')
    recipient = {"external_user_id": "u", "attributes": {"a": "x" * filler}}
    (batch,) = plan(dict(head), [recipient])
    assert len(batch.body) == MAX_BODY_BYTES
    bigger = {"external_user_id": "u", "attributes": {"a": "x" * (filler + 1)}}
    assert fields(encode_recipient(bigger, "recipients[0]", len(head_json))) == ["recipients[0]"]


def test_the_context_goes_out_under_the_tenants_name() -> None:
    head = {"canvas_id": "c", "canvas_entry_properties": {"a": 1}}
    recipients: list[dict[str, object]] = [
        {"external_user_id": "u0", "context": {"b": 2}},
        {"external_user_id": "u1", "canvas_entry_properties": {"b": 3}},
    ]
    (modern,) = plan(head, recipients)
    assert orjson.loads(modern.body) == {
        "canvas_id": "c",
        "context": {"a": 1},
        "recipients": [
            {"external_user_id": "u0", "context": {"b": 2}},
            {"external_user_id": "u1", "context": {"b": 3}},
        ],
    }
    (legacy,) = plan(head, recipients, context_name="canvas_entry_properties")
    assert b'"context"' not in legacy.body
    assert orjson.loads(legacy.body)["recipients"][0] == {
        "external_user_id": "u0",
        "canvas_entry_properties": {"b": 2},
    }
