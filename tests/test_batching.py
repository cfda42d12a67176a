"""Batch planning: at most 50 recipients and 4 MB per body, caller order, exact JSON."""

from __future__ import annotations

import orjson
from canvas_gateway_server.batching import BatchPlanner, encode_head
from canvas_gateway_server.model import MAX_BODY_BYTES, MAX_CONTEXT_BYTES, Batch


def plan(head: dict[str, object], recipients: list[dict[str, object]]) -> list[Batch]:
    head_json = encode_head(head)
    assert isinstance(head_json, bytes)
    planner = BatchPlanner(head_json)
    batches = []
    for position, recipient in enumerate(recipients):
        encoded = planner.encode(recipient, f"recipients[{position}]")
        assert isinstance(encoded, bytes)
        closed = planner.add(position, encoded)
        if closed:
            batches.append(closed)
    last = planner.flush()
    if last:
        batches.append(last)
    return batches


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
    head_json = encode_head({"canvas_id": "c"})
    assert isinstance(head_json, bytes)
    planner = BatchPlanner(head_json)
    found = planner.encode(
        {"external_user_id": "u", "context": {"k": "x" * MAX_CONTEXT_BYTES}}, "recipients[2]"
    )
    assert isinstance(found, list)
    assert [v.field for v in found] == ["recipients[2].context"]
    head_found = encode_head({"canvas_id": "c", "context": {"k": "x" * MAX_CONTEXT_BYTES}})
    assert isinstance(head_found, list) and head_found[0].field == "context"


def test_context_just_under_the_limit_is_accepted() -> None:
    value = "x" * (MAX_CONTEXT_BYTES - len(b'{"k":""}'))
    assert len(orjson.dumps({"k": value})) == MAX_CONTEXT_BYTES
    head = encode_head({"canvas_id": "c", "context": {"k": value}})
    assert isinstance(head, bytes)


def test_a_recipient_too_big_for_any_body_is_refused() -> None:
    head_json = encode_head({"canvas_id": "c"})
    assert isinstance(head_json, bytes)
    found = BatchPlanner(head_json).encode(
        {"external_user_id": "u", "attributes": {"a": "x" * MAX_BODY_BYTES}}, "recipients[0]"
    )
    assert isinstance(found, list) and found[0].field == "recipients[0]"
