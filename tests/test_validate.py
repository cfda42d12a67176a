"""Each of Braze's request rules, checked without a server; the violation's path is asserted."""

from __future__ import annotations

from typing import Any

import pytest
from canvas_gateway_server.braze import MAX_AUDIENCE_DEPTH
from canvas_gateway_server.model import Rule, Violation
from canvas_gateway_server.validate import (
    check_audience,
    check_head,
    check_recipient,
    check_recipient_count,
)
from support import LAST_USED_APP_TIMES


def fields(violations: list[Violation]) -> list[str]:
    return [v.field for v in violations]


def test_valid_head_and_recipient_pass() -> None:
    assert check_head({"canvas_id": "c", "context": {"a": 1}}) == []
    assert check_recipient({"external_user_id": "u1", "context": {"x": 1}}, "recipients[0]") == []


def test_canvas_id_is_required() -> None:
    assert fields(check_head({"canvas_id": ""})) == ["canvas_id"]


def test_context_and_legacy_name_together_are_refused() -> None:
    head = {"canvas_id": "c", "context": {}, "canvas_entry_properties": {}}
    assert fields(check_head(head)) == ["canvas_entry_properties"]
    recipient = {"external_user_id": "u", "context": {}, "canvas_entry_properties": {}}
    assert fields(check_recipient(recipient, "recipients[4]")) == ["recipients[4].canvas_entry_properties"]


def test_legacy_context_name_alone_is_fine() -> None:
    assert check_head({"canvas_id": "c", "canvas_entry_properties": {"a": 1}}) == []


@pytest.mark.parametrize(
    ("head", "count", "field"),
    [
        ({"canvas_id": "c", "broadcast": True}, 1, "broadcast"),
        ({"canvas_id": "c"}, 0, "recipients"),
        ({"canvas_id": "c", "broadcast": False}, 0, "recipients"),
        ({"canvas_id": "c", "audience": {"last_used_app": {}}}, 0, "recipients"),
    ],
)
def test_broadcast_xor_recipients(head: dict[str, Any], count: int, field: str) -> None:
    assert fields(check_recipient_count(head, count)) == [field]


def test_broadcast_without_recipients_and_recipients_without_broadcast_pass() -> None:
    assert check_recipient_count({"canvas_id": "c", "broadcast": True}, 0) == []
    assert check_recipient_count({"canvas_id": "c", "broadcast": False}, 3) == []


@pytest.mark.parametrize(
    ("recipient", "expected"),
    [
        ({}, ["recipients[3]"]),
        ({"external_user_id": "u", "email": "a@b.c", "prioritization": ["identified"]}, ["recipients[3]"]),
        ({"external_user_id": ""}, ["recipients[3].external_user_id"]),
        ({"user_alias": {"alias_name": "", "alias_label": "l"}}, ["recipients[3].user_alias.alias_name"]),
        ({"user_alias": {"alias_name": "n", "alias_label": ""}}, ["recipients[3].user_alias.alias_label"]),
        ({"email": "a@b.c"}, ["recipients[3].prioritization"]),
        ({"email": "not-an-address", "prioritization": ["identified"]}, ["recipients[3].email"]),
        ({"email": "a@b@c", "prioritization": ["identified"]}, ["recipients[3].email"]),
        ({"email": "a@b.c", "prioritization": ["newest"]}, ["recipients[3].prioritization[0]"]),
        (
            {"email": "a@b.c", "prioritization": ["identified", "unidentified"]},
            ["recipients[3].prioritization"],
        ),
        (
            {
                "user_alias": {"alias_name": "n", "alias_label": "l"},
                "send_to_existing_only": False,
                "attributes": {"a": 1},
            },
            ["recipients[3].send_to_existing_only"],
        ),
        ({"external_user_id": "u", "send_to_existing_only": False}, ["recipients[3].attributes"]),
        (
            {"external_user_id": "u", "send_to_existing_only": False, "attributes": {}},
            ["recipients[3].attributes"],
        ),
    ],
)
def test_recipient_rules(recipient: dict[str, Any], expected: list[str]) -> None:
    assert fields(check_recipient(recipient, "recipients[3]")) == expected


@pytest.mark.parametrize(
    "recipient",
    [
        {"email": "a@b.c", "prioritization": ["unidentified", "most_recently_updated"]},
        {"email": "a@b.c", "prioritization": ["least_recently_updated"]},
        {"external_user_id": "u", "send_to_existing_only": False, "attributes": {"email": "a@b.c"}},
        {"external_user_id": "u", "send_to_existing_only": True},
        {"user_alias": {"alias_name": "n", "alias_label": "l"}},
    ],
)
def test_valid_recipients_pass(recipient: dict[str, Any]) -> None:
    assert check_recipient(recipient, "recipients[0]") == []


def test_audience_examples_pass() -> None:
    audience = {
        "AND": [
            {"custom_attribute": {"custom_attribute_name": "n", "comparison": "equals", "value": 1}},
            {"OR": [{"push_subscription_status": {"comparison": "is", "value": "opted_in"}}]},
            {"email_subscription_status": {"comparison": "is_not", "value": "subscribed"}},
            {"last_used_app": {"comparison": "after", "value": "2019-07-22T13:17:55+0000"}},
            {"custom_attribute": {"custom_attribute_name": "n", "comparison": "exists"}},
            {
                "custom_attribute": {
                    "custom_attribute_name": "b",
                    "comparison": "does_not_equal",
                    "value": True,
                }
            },
        ]
    }
    assert check_audience(audience, "audience") == []


@pytest.mark.parametrize(
    ("audience", "expected"),
    [
        ({}, ["audience"]),
        ({"AND": []}, ["audience.AND"]),
        (
            {"AND": [{"OR": [{"custom_attribute": {"custom_attribute_name": "n", "comparison": ""}}]}]},
            [
                "audience.AND[0].OR[0].custom_attribute.comparison",
                "audience.AND[0].OR[0].custom_attribute.value",
            ],
        ),
        (
            {"custom_attribute": {"custom_attribute_name": "", "comparison": "equals", "value": 1}},
            ["audience.custom_attribute.custom_attribute_name"],
        ),
        (
            {"custom_attribute": {"custom_attribute_name": "n", "comparison": "equals", "value": {"a": 1}}},
            ["audience.custom_attribute.value"],
        ),
        (
            {"push_subscription_status": {"comparison": "equals", "value": "opted_in"}},
            ["audience.push_subscription_status.comparison"],
        ),
        (
            {"email_subscription_status": {"comparison": "is", "value": "maybe"}},
            ["audience.email_subscription_status.value"],
        ),
        (
            {"last_used_app": {"comparison": "during", "value": "yesterday"}},
            ["audience.last_used_app.comparison", "audience.last_used_app.value"],
        ),
        (
            {
                "AND": [{"last_used_app": {"comparison": "after", "value": "2020-01-01T00:00:00Z"}}],
                "OR": [{}],
            },
            ["audience"],
        ),
    ],
)
def test_audience_rules(audience: dict[str, Any], expected: list[str]) -> None:
    assert fields(check_audience(audience, "audience")) == expected


def test_audience_depth_is_bounded() -> None:
    node: dict[str, Any] = {"last_used_app": {"comparison": "after", "value": "2020-01-01T00:00:00Z"}}
    for _ in range(MAX_AUDIENCE_DEPTH + 1):
        node = {"AND": [node]}
    found = check_audience(node, "audience")
    assert len(found) == 1 and "deeper" in found[0].description


def test_send_to_existing_only_is_refused_with_any_alias() -> None:
    recipient = {"user_alias": {"alias_name": "n", "alias_label": "l"}, "send_to_existing_only": True}
    assert fields(check_recipient(recipient, "recipients[0]")) == ["recipients[0].send_to_existing_only"]


@pytest.mark.parametrize(("value", "accepted"), LAST_USED_APP_TIMES)
def test_last_used_app_needs_an_iso_datetime_with_a_zone(value: str, accepted: bool) -> None:
    found = check_audience({"last_used_app": {"comparison": "after", "value": value}}, "audience")
    assert (found == []) is accepted


@pytest.mark.parametrize(
    "recipient",
    [
        {"external_user_id": "u", "prioritization": ["identified"]},
        {"user_alias": {"alias_name": "n", "alias_label": "l"}, "prioritization": ["most_recently_updated"]},
        {"email": "a@b.c", "prioritization": ["most_recently_updated", "most_recently_updated"]},
    ],
)
def test_what_braze_does_not_document_as_an_error_passes_through(recipient: dict[str, Any]) -> None:
    """CONTRACT.md 8, point 22: prioritization without email, and repeated values."""
    assert check_recipient(recipient, "recipients[0]") == []


def test_a_value_with_exists_passes_through() -> None:
    """CONTRACT.md 8, point 23: Braze says `value` is omitted for exists, not that one is an error."""
    node = {"custom_attribute": {"custom_attribute_name": "a", "comparison": "exists", "value": 1}}
    assert check_audience(node, "audience") == []


def test_every_violation_names_a_rule_from_the_bounded_set() -> None:
    found = check_recipient({"email": "nope", "prioritization": ["x", "identified", "unidentified"]}, "r")
    assert {v.rule for v in found} == {
        Rule.EMAIL_FORMAT,
        Rule.PRIORITIZATION_VALUE,
        Rule.PRIORITIZATION_CONFLICT,
    }
