"""Unary Send end to end: real gRPC on 127.0.0.1 to the gateway, real HTTP to the fake Braze."""

from __future__ import annotations

from typing import Any

import grpc
import orjson
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from fake_braze import PAUSED_NOTICE, FakeBrazeConfig, Fault
from support import KEYS, REQUEST_EXAMPLES, Harness, example, trigger_from_json, violations_of

CANVAS = "8c7c2864-26b2-4ad0-97ec-48cddfd497d7"


def recipients(n: int) -> list[dict[str, Any]]:
    return [{"external_user_id": f"user-{i}", "context": {"i": i}} for i in range(n)]


async def send(h: Harness, body: dict[str, Any], tenant: str = "acme", **options: Any) -> pb.SendResponse:
    request = pb.SendRequest(trigger=trigger_from_json(body), options=pb.SendOptions(**options))
    response: pb.SendResponse = await h.stub.Send(request, metadata=h.auth(tenant), timeout=30)
    return response


async def refused(h: Harness, body: dict[str, Any], tenant: str = "acme") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(h, body, tenant)
    return caught.value


@pytest.mark.parametrize(("count", "calls"), [(1, [1]), (50, [50]), (51, [50, 1]), (120, [50, 50, 20])])
async def test_recipients_are_split_into_calls_of_at_most_50(
    harness: Harness, count: int, calls: list[int]
) -> None:
    body: dict[str, Any] = {
        "canvas_id": CANVAS,
        "context": {"shared": 12, "price": 9.99},
        "recipients": recipients(count),
    }
    response = await send(harness, body)

    sent = harness.fake.calls
    assert sorted(len(c.body["recipients"]) for c in sent) == sorted(calls)
    assert all(c.status == 201 and c.api_key == KEYS["acme"] for c in sent)
    # every body is the caller's body restricted to the batch's recipients, integers intact
    by_dispatch = {c.dispatch_id: c for c in sent}
    for result in response.results:
        call = by_dispatch[result.braze.dispatch_id]
        expected = {**body, "recipients": [body["recipients"][p] for p in result.positions]}
        assert call.body == expected
        assert b'"shared":12,' in call.raw or b'"shared":12}' in call.raw
        assert result.outcome == pb.OUTCOME_SENT and result.code == 0 and result.braze.http_status == 201
        assert result.attempts == 1 and result.braze.message == "success"
    positions = [p for r in response.results for p in r.positions]
    assert sorted(positions) == list(range(count))
    assert [r.batch_index for r in response.results] == list(range(len(calls)))
    assert response.summary.recipients == count and response.summary.recipients_sent == count
    assert response.summary.batches == len(calls)


async def test_zero_recipients_is_refused_and_nothing_is_sent(harness: Harness) -> None:
    error = await refused(harness, {"canvas_id": CANVAS})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations_of(error)] == ["recipients"]
    assert harness.fake.calls == []


@pytest.mark.parametrize("name", REQUEST_EXAMPLES)
async def test_doc_examples_end_to_end(harness: Harness, name: str) -> None:
    body = example(name)
    tenant = "globex" if "audience" in body else "acme"
    response = await send(harness, body, tenant)
    assert [c.body for c in harness.fake.calls] == [body]
    assert [c.api_key for c in harness.fake.calls] == [KEYS[tenant]]
    (result,) = response.results
    assert result.outcome == pb.OUTCOME_SENT
    assert result.braze.dispatch_id == harness.fake.calls[0].dispatch_id
    assert list(result.positions) == list(range(len(body.get("recipients", []))))


async def test_broadcast_is_one_call_without_a_recipients_key(harness: Harness) -> None:
    body = example("broadcast_connected_audience.json")
    response = await send(harness, body, "globex")
    (call,) = harness.fake.calls
    assert "recipients" not in call.body and call.body["broadcast"] is True
    assert list(response.results[0].positions) == []
    assert response.summary.batches == 1


async def test_a_tenant_without_broadcast_rights_is_refused(harness: Harness) -> None:
    error = await refused(harness, example("broadcast_connected_audience.json"), "acme")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await refused(harness, example("kitchen_sink.json"), "acme")  # audience with recipients
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert harness.fake.calls == []


async def test_validate_only_plans_and_sends_nothing(harness: Harness) -> None:
    body = {"canvas_id": CANVAS, "recipients": recipients(120)}
    response = await send(harness, body, validate_only=True)
    assert harness.fake.calls == []
    assert [len(r.positions) for r in response.results] == [50, 50, 20]
    assert {r.outcome for r in response.results} == {pb.OUTCOME_NOT_ATTEMPTED}
    assert {r.code for r in response.results} == {0}
    assert response.summary.recipients_not_attempted == 120


async def test_validate_only_still_validates(harness: Harness) -> None:
    body = {"canvas_id": CANVAS, "recipients": [{"email": "a@example.com"}]}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(harness, body, validate_only=True)
    assert [f for f, _ in violations_of(caught.value)] == ["recipients[0].prioritization"]


ONE = [{"external_user_id": "u"}]
INVALID = [
    (
        {
            "canvas_id": "c",
            "context": {"a": 1},
            "recipients": [
                {"external_user_id": "u"},
                {"external_user_id": "v", "canvas_entry_properties": {}, "context": {}},
            ],
        },
        ["recipients[1].canvas_entry_properties"],
    ),
    (
        {
            "canvas_id": "c",
            "context": {"order_id": 1234567890123456789},
            "recipients": [{"external_user_id": "u"}],
        },
        ["context"],
    ),
    ({"canvas_id": "", "recipients": [{"external_user_id": "u"}]}, ["canvas_id"]),
    ({"canvas_id": "c", "broadcast": True, "recipients": [{"external_user_id": "u"}]}, ["broadcast"]),
    (
        {
            "canvas_id": "c",
            "context": {},
            "canvas_entry_properties": {},
            "recipients": [{"external_user_id": "u"}],
        },
        ["canvas_entry_properties"],
    ),
    ({"canvas_id": "c", "recipients": [{"external_user_id": "u"}, {}]}, ["recipients[1]"]),
    (
        {
            "canvas_id": "c",
            "recipients": [
                {"external_user_id": "a"},
                {"external_user_id": "b"},
                {"external_user_id": "c"},
                {"email": "x@example.com"},
            ],
        },
        ["recipients[3].prioritization"],
    ),
    (
        {
            "canvas_id": "c",
            "recipients": [
                {
                    "user_alias": {"alias_name": "n", "alias_label": "l"},
                    "send_to_existing_only": False,
                    "attributes": {"a": 1},
                }
            ],
        },
        ["recipients[0].send_to_existing_only"],
    ),
    (
        {"canvas_id": "c", "recipients": [{"external_user_id": "u", "send_to_existing_only": False}]},
        ["recipients[0].attributes"],
    ),
    (
        {"canvas_id": "c", "context": {"blob": "x" * 50_000}, "recipients": [{"external_user_id": "u"}]},
        ["context"],
    ),
    (
        {"canvas_id": "c", "recipients": [{"external_user_id": "u", "context": {"blob": "x" * 50_000}}]},
        ["recipients[0].context"],
    ),
    (
        {"canvas_id": "c", "recipients": [{"external_user_id": "u", "attributes": {"b": "x" * 4_000_000}}]},
        ["recipients[0]"],
    ),
    (
        {
            "canvas_id": "c",
            "broadcast": True,
            "audience": {"AND": [{"push_subscription_status": {"comparison": "is", "value": "maybe"}}]},
        },
        ["audience.AND[0].push_subscription_status.value"],
    ),
]


@pytest.mark.parametrize(("body", "paths"), INVALID)
async def test_invalid_requests_name_the_field_and_send_nothing(
    harness: Harness, body: dict[str, Any], paths: list[str]
) -> None:
    error = await refused(harness, body, "globex")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations_of(error)] == paths
    assert paths[0] in (error.details() or "")
    assert harness.fake.calls == []


async def test_every_violation_is_reported_at_once(harness: Harness) -> None:
    body = {"canvas_id": "c", "recipients": [{}, {"external_user_id": "ok"}, {"email": "a@b.c"}]}
    error = await refused(harness, body)
    assert [f for f, _ in violations_of(error)] == ["recipients[0]", "recipients[2].prioritization"]
    error = await refused(harness, {**body, "canvas_id": ""})
    assert [f for f, _ in violations_of(error)] == [
        "canvas_id",
        "recipients[0]",
        "recipients[2].prioritization",
    ]


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """What the status costs on the wire: details base64-encoded, plus the message."""
    details = sum(len(v) for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin")
    return details * 4 // 3 + len((error.details() or "").encode())


async def test_thousands_of_violations_still_arrive_as_invalid_argument(harness: Harness) -> None:
    body = {"canvas_id": CANVAS, "recipients": [{"email": f"p{i}@example.com"} for i in range(3_000)]}
    error = await refused(harness, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # not a trailer too big for the client
    found = violations_of(error)
    assert 20 <= len(found) < 3_000
    assert [f for f, _ in found] == [f"recipients[{i}].prioritization" for i in range(len(found))]
    assert f"the first {len(found)} of 3000 violations" in (error.details() or "")
    assert trailer_bytes(error) < 8_192


async def test_long_audience_paths_keep_the_status_small(harness: Harness) -> None:
    def deep(levels: int) -> dict[str, Any]:
        node: dict[str, Any] = {"push_subscription_status": {"comparison": "was", "value": "maybe"}}
        for _ in range(levels):
            node = {"AND": [node]}
        return node

    body = {"canvas_id": CANVAS, "broadcast": True, "audience": {"OR": [deep(30) for _ in range(30)]}}
    error = await refused(harness, body, "globex")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(error)
    assert trailer_bytes(error) < 8_192


@pytest.mark.parametrize("settings_overrides", [{"unary_max_recipients": 100}])
async def test_unary_recipient_cap(harness: Harness) -> None:
    error = await refused(harness, {"canvas_id": CANVAS, "recipients": recipients(101)})
    assert [f for f, _ in violations_of(error)] == ["recipients"]
    assert "SendStream" in violations_of(error)[0][1]
    assert harness.fake.calls == []
    await send(harness, {"canvas_id": CANVAS, "recipients": recipients(100)})
    assert len(harness.fake.calls) == 2


async def test_two_tenants_each_reach_braze_with_their_own_key(harness: Harness) -> None:
    await send(harness, {"canvas_id": CANVAS, "recipients": recipients(3)}, "acme")
    await send(harness, {"canvas_id": CANVAS, "recipients": recipients(2)}, "globex")
    keys = [(c.api_key, len(c.body["recipients"])) for c in harness.fake.calls]
    assert keys == [(KEYS["acme"], 3), (KEYS["globex"], 2)]


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-token"),), (("authorization", "token-acme-4f1c"),)],
)
async def test_missing_or_unknown_tokens_are_refused(
    harness: Harness, metadata: tuple[tuple[str, str], ...]
) -> None:
    request = pb.SendRequest(trigger=trigger_from_json({"canvas_id": CANVAS, "recipients": recipients(1)}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Send(request, metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert harness.fake.calls == []


@pytest.mark.parametrize(
    "fake_config", [FakeBrazeConfig(api_keys=frozenset(KEYS.values()), paused_canvases=frozenset({"paused"}))]
)
async def test_paused_canvas_is_accepted_but_not_counted_as_sent(harness: Harness) -> None:
    response = await send(harness, {"canvas_id": "paused", "recipients": recipients(2)})
    (result,) = response.results
    assert result.outcome == pb.OUTCOME_CANVAS_INACTIVE
    assert result.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and not result.retryable
    assert result.braze.notice == PAUSED_NOTICE and result.braze.http_status == 201
    assert result.braze.dispatch_id == harness.fake.calls[0].dispatch_id != ""
    assert "nothing was sent" in result.status_message
    assert (response.summary.recipients_sent, response.summary.recipients_canvas_inactive) == (0, 2)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_refused_naming_the_base_url(harness: Harness, status: int) -> None:
    harness.fake.faults.script([Fault.status(status, b"")])
    (result,) = (await send(harness, {"canvas_id": CANVAS, "recipients": recipients(3)})).results
    assert result.outcome == pb.OUTCOME_REJECTED and result.braze.http_status == status
    assert result.code == grpc.StatusCode.INTERNAL.value[0] and not result.retryable
    assert "braze_rest_url" in result.status_message and result.attempts == 1


async def test_a_legacy_workspace_gets_canvas_entry_properties(harness: Harness) -> None:
    body = {
        "canvas_id": CANVAS,
        "context": {"shared": 1},
        "recipients": [{"external_user_id": "u0", "context": {"i": 0}}],
    }
    assert (await send(harness, body, tenant="initech")).summary.recipients_sent == 1
    (call,) = harness.fake.calls
    assert call.api_key == KEYS["initech"]
    assert call.body == {
        "canvas_id": CANVAS,
        "canvas_entry_properties": {"shared": 1},
        "recipients": [{"external_user_id": "u0", "canvas_entry_properties": {"i": 0}}],
    }


async def test_either_context_name_goes_out_under_the_tenants_one(harness: Harness) -> None:
    body = {
        "canvas_id": CANVAS,
        "canvas_entry_properties": {"shared": 1},
        "recipients": [
            {"external_user_id": "u0", "context": {"i": 0}},
            {"external_user_id": "u1", "canvas_entry_properties": {"i": 1}},
        ],
    }
    response = await send(harness, body)
    assert response.summary.recipients_sent == 2
    (call,) = harness.fake.calls
    assert call.body == {
        "canvas_id": CANVAS,
        "context": {"shared": 1},
        "recipients": [
            {"external_user_id": "u0", "context": {"i": 0}},
            {"external_user_id": "u1", "context": {"i": 1}},
        ],
    }


async def test_braze_non_fatal_errors_are_passed_through(harness: Harness) -> None:
    reply = {"dispatch_id": "d1", "message": "success", "errors": ["minor", {"code": 7}]}
    harness.fake.faults.script([Fault.status(201, orjson.dumps(reply))])
    (result,) = (await send(harness, {"canvas_id": CANVAS, "recipients": recipients(1)})).results
    assert result.outcome == pb.OUTCOME_SENT and result.braze.dispatch_id == "d1"
    assert result.braze.errors[0].string_value == "minor"
    assert result.braze.errors[1].struct_value["code"] == 7


TOP_LEVEL_FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "canvas_id_required": ({"canvas_id": ""}, "canvas_id"),
    "context_both_names": ({"context": {}, "canvas_entry_properties": {}}, "canvas_entry_properties"),
    "context_too_large": ({"context": {"blob": "x" * 50_001}}, "context"),
    "number_not_exact": ({"context": {"id": 2**60}}, "context"),
    "broadcast_with_recipients": ({"broadcast": True}, "broadcast"),
}
RECIPIENT_FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "identifier_count": ({"context": {"a": 1}}, ""),  # none: two cannot be expressed (a oneof)
    "email_format": ({"email": "nope", "prioritization": ["identified"]}, ".email"),
    "prioritization_required": ({"email": "a@b.c"}, ".prioritization"),
    "context_too_large": ({"external_user_id": "u", "context": {"blob": "x" * 60_000}}, ".context"),
    "number_not_exact": ({"external_user_id": "u", "attributes": {"n": 2**60}}, ".attributes"),
    "attributes_required": ({"external_user_id": "u", "send_to_existing_only": False}, ".attributes"),
}


@pytest.mark.parametrize("recipient_rule", sorted(RECIPIENT_FAULTS))
@pytest.mark.parametrize("top_rule", sorted(TOP_LEVEL_FAULTS))
async def test_send_reports_a_top_level_and_a_recipient_violation_together(
    harness: Harness, top_rule: str, recipient_rule: str
) -> None:
    top, top_field = TOP_LEVEL_FAULTS[top_rule]
    bad, bad_field = RECIPIENT_FAULTS[recipient_rule]
    body = {"canvas_id": CANVAS, **top, "recipients": [{"external_user_id": "ok"}, bad]}
    error = await refused(harness, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = [field for field, _ in violations_of(error)]
    assert top_field in found
    assert f"recipients[1]{bad_field}" in found
    assert harness.fake.calls == []
