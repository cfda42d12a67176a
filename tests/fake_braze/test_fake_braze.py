"""The fake Braze through real HTTP on 127.0.0.1: rules, auth, limits, faults, admin API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from canvas_gateway_server.braze import MAX_AUDIENCE_DEPTH, MAX_BODY_BYTES
from canvas_gateway_server.loopback import is_loopback
from fake_braze import (
    ARCHIVED_NOTICE,
    PAUSED_NOTICE,
    FakeBraze,
    FakeBrazeConfig,
    Fault,
    rules,
)
from fake_braze.__main__ import config_from_args, main
from multidict import CIMultiDictProxy
from support import LAST_USED_APP_TIMES, Clock

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "docs" / "braze" / "examples"
EXAMPLES = {path.stem: path.read_bytes() for path in EXAMPLES_DIR.glob("*.json")}
REQUEST_EXAMPLES = sorted(name for name in EXAMPLES if not name.startswith("response_"))
assert len(REQUEST_EXAMPLES) >= 6, f"Braze examples not found in {EXAMPLES_DIR}"
KEY = "test-key"
OTHER_KEY = "other-key"
CANVAS = "8c7c2864-26b2-4ad0-97ec-48cddfd497d7"
HOUR_START = 1_750_190_400.0  # 2025-06-17T20:00:00Z
LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
DROP = object()  # marks a field to remove in body()


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


def body(**fields: Any) -> dict[str, Any]:
    """A valid recipient-targeted body with `fields` replaced (DROP removes one)."""
    data: dict[str, Any] = {"canvas_id": CANVAS, "recipients": [{"external_user_id": "user-1"}]}
    for name, value in fields.items():
        if value is DROP:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def recipient(**fields: Any) -> dict[str, Any]:
    """A body with exactly one recipient made of `fields`."""
    return body(recipients=[fields])


def email(**fields: Any) -> dict[str, Any]:
    """A body with one email recipient; `fields` are added to it."""
    return recipient(**{"email": "sam@example.com", "prioritization": ["most_recently_updated"], **fields})


def audience(node: Any, **fields: Any) -> dict[str, Any]:
    """A broadcast body with `node` as its audience."""
    return {"canvas_id": CANVAS, "broadcast": True, "audience": node, **fields}


def custom(**spec: Any) -> dict[str, Any]:
    return audience({"custom_attribute": spec})


def nested(levels: int) -> dict[str, Any]:
    """`levels` ANDs around one filter: the filter sits at depth `levels`."""
    node: dict[str, Any] = {"push_subscription_status": {"comparison": "is", "value": "opted_in"}}
    for _ in range(levels):
        node = {"AND": [node]}
    return node


SUB = {"comparison": "is", "value": "opted_in"}
BIG = "x" * 50_000  # makes any object holding it exceed 50,000 bytes once serialized


@pytest.fixture
def clock() -> Clock:
    return Clock(HOUR_START + 1800)


@pytest.fixture
def config(clock: Clock) -> FakeBrazeConfig:
    return FakeBrazeConfig(
        api_keys=frozenset({KEY, OTHER_KEY}),
        paused_canvases=frozenset({"paused-canvas"}),
        archived_canvases=frozenset({"archived-canvas"}),
        clock=clock,
    )


@pytest.fixture
async def fake(config: FakeBrazeConfig) -> AsyncIterator[FakeBraze]:
    async with FakeBraze(config) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


async def post(
    session: aiohttp.ClientSession,
    fake: FakeBraze,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    key: str | None = KEY,
    content_type: str | None = "application/json",
    authorization: str | None = None,
) -> Answer:
    """POST to the trigger endpoint and read the whole answer."""
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if content_type is not None:
        headers["Content-Type"] = content_type
    data = raw if raw is not None else json.dumps(payload).encode()
    url = f"{fake.url}/canvas/trigger/send"
    async with session.post(url, data=io.BytesIO(data), headers=headers) as resp:
        return Answer(resp.status, resp.headers, await resp.text())


# --- Success ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUEST_EXAMPLES)
async def test_every_request_example_is_accepted(
    session: aiohttp.ClientSession, fake: FakeBraze, name: str
) -> None:
    payload = json.loads(EXAMPLES[name])
    answer = await post(session, fake, raw=EXAMPLES[name])
    assert answer.status == 201, answer.text
    assert answer.json.keys() == {"dispatch_id", "message"}
    assert answer.json["message"] == "success"
    assert len(answer.json["dispatch_id"]) == 32
    int(answer.json["dispatch_id"], 16)
    assert answer.headers["Content-Type"].startswith("application/json")
    (call,) = fake.calls
    assert (call.status, call.body, call.api_key) == (201, payload, KEY)
    assert call.dispatch_id == answer.json["dispatch_id"]


async def test_dispatch_id_is_new_per_call(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    ids = {(await post(session, fake, body())).json["dispatch_id"] for _ in range(5)}
    assert len(ids) == 5
    assert fake.recipients_sent == 5
    assert [call.status for call in fake.sent()] == [201] * 5


@pytest.mark.parametrize(
    ("canvas_id", "notice"),
    [("paused-canvas", PAUSED_NOTICE), ("archived-canvas", ARCHIVED_NOTICE)],
)
async def test_inactive_canvas_succeeds_with_notice_and_sends_nothing(
    session: aiohttp.ClientSession, fake: FakeBraze, canvas_id: str, notice: str
) -> None:
    answer = await post(session, fake, body(canvas_id=canvas_id))
    assert answer.status == 201
    assert answer.json == {
        "dispatch_id": answer.json["dispatch_id"],
        "message": "success",
        "notice": notice,
    }
    assert fake.calls[0].notice == notice
    assert fake.sent() == []
    assert fake.recipients_sent == 0


ACCEPTED = [
    pytest.param(body(recipients=[{"external_user_id": f"u{i}"} for i in range(50)]), id="50"),
    pytest.param(body(context={"k": "x" * (50_000 - 8)}), id="context-exactly-50000-bytes"),
    pytest.param(body(context=DROP, canvas_entry_properties={"a": 1}), id="legacy-cep"),
    pytest.param(recipient(external_user_id="u", canvas_entry_properties={"a": 1}), id="cep-rcpt"),
    pytest.param(body(broadcast=False), id="broadcast-false-with-recipients"),
    pytest.param({"canvas_id": CANVAS, "broadcast": True}, id="broadcast-dashboard-audience"),
    pytest.param(body(audience={"push_subscription_status": SUB}), id="audience-and-recipients"),
    pytest.param(email(), id="email-most-recently-updated"),
    pytest.param(
        recipient(email="a@b.c", prioritization=["identified", "least_recently_updated"]),
        id="email-identified",
    ),
    pytest.param(
        recipient(external_user_id="u", send_to_existing_only=False, attributes={"a": 1}),
        id="create-user",
    ),
    pytest.param(
        recipient(external_user_id="u", send_to_existing_only=True, attributes={}),
        id="existing-only-empty-attributes",
    ),
    pytest.param(custom(custom_attribute_name="n", comparison="exists"), id="exists"),
    # Not documented as errors, so accepted as Braze would (CONTRACT 8, points 22 to 25):
    pytest.param(custom(custom_attribute_name="n", comparison="exists", value=True), id="exists-with-value"),
    pytest.param(
        email(prioritization=["most_recently_updated", "most_recently_updated"]),
        id="prioritization-duplicate",
    ),
    pytest.param(
        recipient(external_user_id="u", prioritization=["identified"]), id="prioritization-without-email"
    ),
    pytest.param(body(context={"id": 2**60}), id="integer-past-2-53"),
    pytest.param(
        {
            "canvas_id": CANVAS,
            "context": {},
            "recipients": [{"external_user_id": "u", "canvas_entry_properties": {}}],
        },
        id="both-context-names-in-different-objects",
    ),
    pytest.param(custom(custom_attribute_name="n", comparison="does_not_exist"), id="not-exists"),
    pytest.param(custom(custom_attribute_name="b", comparison="not_equal", value=False), id="not-equal"),
    pytest.param(
        custom(custom_attribute_name="b", comparison="does_not_equal", value=True),
        id="does-not-equal",
    ),
    pytest.param(
        custom(custom_attribute_name="n", comparison="less_than_x_days_ago", value=2.5),
        id="number-value",
    ),
    pytest.param(audience(nested(MAX_AUDIENCE_DEPTH)), id="audience-at-the-depth-limit"),
    pytest.param(
        audience({"last_used_app": {"comparison": "before", "value": "2019-07-22T13:17:55+0000"}}),
        id="last-used-app",
    ),
]


@pytest.mark.parametrize("payload", ACCEPTED)
async def test_valid_edge_cases_are_accepted(
    session: aiohttp.ClientSession, fake: FakeBraze, payload: dict[str, Any]
) -> None:
    assert rules.check_request(payload) is None
    answer = await post(session, fake, payload)
    assert answer.status == 201, answer.text


# --- Validation: every rule, one violation at a time -------------------------------------------

INVALID = [
    # canvas_id
    pytest.param(body(canvas_id=DROP), id="canvas-id-missing"),
    pytest.param(body(canvas_id=""), id="canvas-id-empty"),
    pytest.param(body(canvas_id=123), id="canvas-id-number"),
    pytest.param(body(canvas_id=None), id="canvas-id-null"),
    # top-level fields
    pytest.param(body(segment_id="s"), id="unknown-segment-id"),
    pytest.param(body(trigger_properties={}), id="unknown-trigger-properties"),
    pytest.param(body(api_key=KEY), id="api-key-in-body"),
    # context / canvas_entry_properties
    pytest.param(body(context=["a"]), id="context-list"),
    pytest.param(body(context="a"), id="context-string"),
    pytest.param(body(context=None), id="context-null"),
    pytest.param(body(canvas_entry_properties=[]), id="cep-list"),
    pytest.param(body(context={"k": BIG}), id="context-over-50000"),
    pytest.param(body(canvas_entry_properties={"k": BIG}), id="cep-over-50000"),
    pytest.param(body(context={}, canvas_entry_properties={}), id="context-and-cep"),
    # broadcast and recipients
    pytest.param(body(broadcast="true"), id="broadcast-string"),
    pytest.param(body(broadcast=1), id="broadcast-number"),
    pytest.param(body(broadcast=None), id="broadcast-null"),
    pytest.param(body(recipients={"external_user_id": "u"}), id="recipients-object"),
    pytest.param(body(recipients=None), id="recipients-null"),
    pytest.param(body(recipients=[]), id="recipients-empty"),
    pytest.param(body(recipients=["u"]), id="recipient-string"),
    pytest.param(body(broadcast=True), id="broadcast-true-with-recipients"),
    pytest.param(body(broadcast=True, recipients=[]), id="broadcast-true-with-empty-list"),
    pytest.param(body(recipients=DROP), id="no-recipients-no-broadcast"),
    pytest.param(body(recipients=DROP, broadcast=False), id="no-recipients-broadcast-false"),
    pytest.param(
        body(recipients=DROP, audience={"push_subscription_status": SUB}),
        id="audience-without-broadcast",
    ),
    # recipient shape and identifiers
    pytest.param(recipient(external_user_id="u", braze_id="b"), id="recipient-braze-id"),
    pytest.param(recipient(context={}), id="recipient-no-identifier"),
    pytest.param(recipient(external_user_id="u", email="a@b.c"), id="two-identifiers"),
    pytest.param(
        recipient(
            external_user_id="u",
            user_alias={"alias_name": "a", "alias_label": "b"},
            email="a@b.c",
            prioritization=["identified"],
        ),
        id="three-identifiers",
    ),
    pytest.param(recipient(external_user_id=48213), id="external-id-number"),
    pytest.param(recipient(external_user_id=""), id="external-id-empty"),
    pytest.param(recipient(external_user_id=None), id="external-id-null"),
    pytest.param(recipient(user_alias={"alias_name": "a"}), id="alias-no-label"),
    pytest.param(recipient(user_alias={"alias_name": "a", "alias_label": "b", "x": 1}), id="alias-extra"),
    pytest.param(recipient(user_alias={"alias_name": "", "alias_label": "b"}), id="alias-empty"),
    pytest.param(recipient(user_alias={"alias_name": "a", "alias_label": 1}), id="alias-number"),
    pytest.param(recipient(user_alias="a"), id="alias-string"),
    # email and prioritization
    pytest.param(email(email="sam.example.com"), id="email-no-at"),
    pytest.param(email(email="a@b@c"), id="email-two-at"),
    pytest.param(email(email="@example.com"), id="email-no-local"),
    pytest.param(email(email="sam@"), id="email-no-domain"),
    pytest.param(email(email=""), id="email-empty"),
    pytest.param(email(email=7), id="email-number"),
    pytest.param(recipient(email="a@b.c"), id="email-no-prioritization"),
    pytest.param(email(prioritization=[]), id="prioritization-empty"),
    pytest.param(email(prioritization="identified"), id="prioritization-string"),
    pytest.param(email(prioritization=["newest"]), id="prioritization-unknown"),
    pytest.param(email(prioritization=[["identified"]]), id="prioritization-nested"),
    pytest.param(email(prioritization=["identified", "unidentified"]), id="identified-both"),
    # send_to_existing_only and attributes
    pytest.param(recipient(external_user_id="u", send_to_existing_only="false"), id="existing-only-string"),
    pytest.param(recipient(external_user_id="u", send_to_existing_only=None), id="existing-null"),
    pytest.param(
        recipient(
            user_alias={"alias_name": "a", "alias_label": "b"},
            send_to_existing_only=False,
            attributes={"a": 1},
        ),
        id="alias-create",
    ),
    pytest.param(recipient(external_user_id="u", send_to_existing_only=False), id="create-no-attributes"),
    pytest.param(
        recipient(external_user_id="u", send_to_existing_only=False, attributes={}),
        id="create-empty-attributes",
    ),
    pytest.param(recipient(external_user_id="u", attributes=["a"]), id="attributes-list"),
    pytest.param(recipient(external_user_id="u", attributes="a"), id="attributes-string"),
    # per-recipient contexts
    pytest.param(recipient(external_user_id="u", context=[]), id="recipient-context-list"),
    pytest.param(recipient(external_user_id="u", context={"k": BIG}), id="recipient-context-big"),
    pytest.param(recipient(external_user_id="u", canvas_entry_properties={"k": BIG}), id="recipient-cep-big"),
    pytest.param(
        recipient(external_user_id="u", context={}, canvas_entry_properties={}),
        id="recipient-context-and-cep",
    ),
    # audience grammar
    pytest.param(audience([]), id="audience-list"),
    pytest.param(audience(None), id="audience-null"),
    pytest.param(audience({}), id="audience-empty"),
    pytest.param(
        audience({"push_subscription_status": SUB, "email_subscription_status": SUB}),
        id="audience-two-keys",
    ),
    pytest.param(audience({"segment": "s"}), id="audience-unknown-filter"),
    pytest.param(audience({"AND": []}), id="and-empty"),
    pytest.param(audience({"OR": {"push_subscription_status": SUB}}), id="or-object"),
    pytest.param(audience({"AND": [{"push_subscription_status": SUB}, {}]}), id="and-bad-child"),
    pytest.param(audience({"OR": [{"AND": [{"x": 1}]}]}), id="nested-bad-child"),
    pytest.param(audience({"custom_attribute": "n"}), id="custom-string"),
    pytest.param(custom(comparison="equals", value="v"), id="custom-no-name"),
    pytest.param(custom(custom_attribute_name="", comparison="equals", value=1), id="name-empty"),
    pytest.param(custom(custom_attribute_name="n", value=1), id="custom-no-comparison"),
    pytest.param(custom(custom_attribute_name="n", comparison="", value=1), id="comparison-empty"),
    pytest.param(custom(custom_attribute_name="n", comparison=1, value=1), id="comparison-number"),
    pytest.param(custom(custom_attribute_name="n", comparison="equals"), id="custom-no-value"),
    pytest.param(custom(custom_attribute_name="n", comparison="equals", value=None), id="value-null"),
    pytest.param(custom(custom_attribute_name="n", comparison="equals", value=[1]), id="value-list"),
    pytest.param(custom(custom_attribute_name="n", comparison="equals", value={"a": 1}), id="value-object"),
    pytest.param(custom(custom_attribute_name="n", comparison="equals", value=1, extra=1), id="custom-extra"),
    pytest.param(
        audience({"push_subscription_status": {"comparison": "equals", "value": "opted_in"}}),
        id="push-comparison",
    ),
    pytest.param(
        audience({"push_subscription_status": {"comparison": "is", "value": "maybe"}}),
        id="push-value",
    ),
    pytest.param(
        audience({"push_subscription_status": {"comparison": ["is"], "value": "opted_in"}}),
        id="push-comparison-list",
    ),
    pytest.param(
        audience({"push_subscription_status": {"comparison": "is", "value": {"a": 1}}}),
        id="push-value-object",
    ),
    pytest.param(audience({"push_subscription_status": {"comparison": "is"}}), id="push-no-value"),
    pytest.param(audience({"push_subscription_status": {**SUB, "extra": 1}}), id="push-extra-key"),
    pytest.param(audience({"push_subscription_status": "opted_in"}), id="push-string"),
    pytest.param(
        audience({"email_subscription_status": {"comparison": "is_not", "value": "bounced"}}),
        id="email-status-value",
    ),
    pytest.param(
        audience({"last_used_app": {"comparison": "is", "value": "2019-07-22T13:17:55+0000"}}),
        id="last-used-comparison",
    ),
    pytest.param(
        audience({"last_used_app": {"comparison": "after", "value": 1563801475}}),
        id="last-used-number",
    ),
    pytest.param(audience({"last_used_app": {"comparison": "after"}}), id="last-used-no-value"),
    pytest.param(audience(nested(MAX_AUDIENCE_DEPTH + 1)), id="audience-past-the-depth-limit"),
]


@pytest.mark.parametrize("payload", INVALID)
async def test_each_rule_rejects_with_400(
    session: aiohttp.ClientSession, fake: FakeBraze, payload: dict[str, Any]
) -> None:
    expected = rules.check_request(payload)
    assert expected is not None
    answer = await post(session, fake, payload)
    assert answer.status == 400, answer.text
    assert answer.json == {"message": expected[1]}
    assert all(answer.headers[name] for name in LIMIT_HEADERS)
    assert fake.calls[0].status == 400
    assert fake.recipients_sent == 0


async def test_more_than_50_recipients_gets_braze_message(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    payload = body(recipients=[{"external_user_id": f"u{i}"} for i in range(51)])
    answer = await post(session, fake, payload)
    assert answer.status == 400
    assert answer.json == json.loads(EXAMPLES["response_400"])


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"not json", b"\xff\xfe", b'{"a": NaN}', b"[]", b'"text"', b"42", b"null"]
)
async def test_non_json_or_non_object_body_is_400(
    session: aiohttp.ClientSession, fake: FakeBraze, raw: bytes
) -> None:
    answer = await post(session, fake, raw=raw)
    assert answer.status == 400
    assert set(answer.json) == {"message"}
    assert fake.calls[0].raw == raw


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_content_type_must_be_json(
    session: aiohttp.ClientSession, fake: FakeBraze, content_type: str | None
) -> None:
    answer = await post(session, fake, body(), content_type=content_type)
    assert answer.status == 400
    assert "Content-Type" in answer.json["message"]
    assert fake.calls[0].body == body()  # recorded even though refused


async def test_content_type_parameters_are_allowed(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    answer = await post(session, fake, body(), content_type="application/json; charset=utf-8")
    assert answer.status == 201


async def test_body_over_4mb_is_413_and_4mb_exactly_is_fine(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    valid = json.dumps(body()).encode()
    exact = valid + b" " * (MAX_BODY_BYTES - len(valid))  # trailing whitespace is valid JSON
    assert (await post(session, fake, raw=exact)).status == 201
    answer = await post(session, fake, raw=exact + b" ")
    assert answer.status == 413
    assert set(answer.json) == {"message"}
    assert "x-ratelimit-remaining" not in answer.headers  # refused at the edge: no budget used
    assert [call.status for call in fake.calls] == [201, 413]
    wrong_key = await post(session, fake, raw=exact + b" ", key="not-a-key")
    assert wrong_key.status == 413  # before the key is looked at


async def test_chunked_body_over_4mb_is_413(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 1_000_000

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with session.post(f"{fake.url}/canvas/trigger/send", data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        assert "message" in await resp.json()


# --- Authentication ----------------------------------------------------------------------------


async def test_unknown_key_is_401_echoing_key_with_empty_limit_headers(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    answer = await post(session, fake, body(), key="non-existent")
    assert answer.status == 401
    assert answer.json == json.loads(EXAMPLES["response_401"])
    expected_headers = json.loads(EXAMPLES["response_401.headers"])
    for name in LIMIT_HEADERS:
        assert answer.headers[name] == expected_headers[name] == ""
    assert (fake.calls[0].status, fake.calls[0].api_key) == (401, "non-existent")


@pytest.mark.parametrize(
    ("authorization", "echo"),
    [
        (None, ""),
        (f'Bearer "{KEY}"', f'"{KEY}"'),
        (f"Bearer '{KEY}'", f"'{KEY}'"),
        (KEY, KEY),
        (f"bearer {KEY}", f"bearer {KEY}"),
        (f"Basic {KEY}", f"Basic {KEY}"),
        (f"Bearer  {KEY}", f" {KEY}"),
        ("Bearer ", "Bearer"),  # trailing whitespace is not part of a header value
    ],
)
async def test_missing_quoted_or_malformed_key_is_401(
    session: aiohttp.ClientSession, fake: FakeBraze, authorization: str | None, echo: str
) -> None:
    answer = await post(session, fake, body(), key=None, authorization=authorization)
    assert answer.status == 401
    assert answer.json == {"message": f"Invalid API key: {echo}"}
    assert all(answer.headers[name] == "" for name in LIMIT_HEADERS)


async def test_auth_comes_before_validation(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    assert (await post(session, fake, raw=b"junk", key="wrong")).status == 401
    assert (await post(session, fake, raw=b"junk", key=OTHER_KEY)).status == 400


# --- Rate limits -------------------------------------------------------------------------------


async def test_hourly_budget_headers_then_429_then_clock_hour_reset(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    config = FakeBrazeConfig(api_keys=frozenset({KEY, OTHER_KEY}), hourly_limit=3, clock=clock)
    async with FakeBraze(config) as fake:
        first = await post(session, fake, body())
        assert first.status == 201
        assert first.headers["x-ratelimit-limit"] == "3"
        assert first.headers["x-ratelimit-remaining"] == "2"
        assert first.headers["x-ratelimit-reset"] == str(int(HOUR_START) + 3600)
        invalid = await post(session, fake, body(canvas_id=""))  # a 400 still counts
        assert (invalid.status, invalid.headers["x-ratelimit-remaining"]) == (400, "1")
        assert (await post(session, fake, body())).headers["x-ratelimit-remaining"] == "0"
        limited = await post(session, fake, body())
        assert limited.status == 429
        assert limited.json == json.loads(EXAMPLES["response_429"])
        assert limited.headers["x-ratelimit-remaining"] == "0"
        assert limited.headers["x-ratelimit-reset"] == str(int(HOUR_START) + 3600)
        assert (await post(session, fake, body(), key=OTHER_KEY)).status == 201  # per key

        clock.now = HOUR_START + 3599.9  # still the same clock hour
        assert (await post(session, fake, body())).status == 429
        clock.now = HOUR_START + 3600  # the clock hour turns: a fresh budget
        fresh = await post(session, fake, body())
        assert fresh.status == 201
        assert fresh.headers["x-ratelimit-remaining"] == "2"
        assert fresh.headers["x-ratelimit-reset"] == str(int(HOUR_START) + 7200)
        assert fake.status_counts[429] == 2


async def test_a_shorter_hourly_window_resets_on_its_own_boundaries(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    config = FakeBrazeConfig(api_keys=frozenset({KEY}), hourly_limit=2, hourly_window_seconds=5, clock=clock)
    async with FakeBraze(config) as fake:
        clock.now = 1_000_000_002.5  # windows of 5 s aligned to the epoch: this one ends at ...005
        first = await post(session, fake, body())
        assert (first.headers["x-ratelimit-remaining"], first.headers["x-ratelimit-reset"]) == (
            "1",
            "1000000005",
        )
        assert (await post(session, fake, body())).status == 201
        assert (await post(session, fake, body())).status == 429
        clock.now = 1_000_000_005.0
        fresh = await post(session, fake, body())
        assert (fresh.status, fresh.headers["x-ratelimit-reset"]) == (201, "1000000010")


async def test_broadcast_limited_per_audience_and_per_key(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    config = FakeBrazeConfig(
        api_keys=frozenset({KEY}),
        hourly_limit=1,
        broadcast_per_minute=25,
        broadcast_per_minute_per_audience=10,
        clock=clock,
    )
    minute_end = str(int(clock.now // 60 * 60 + 60))
    sub = {"push_subscription_status": SUB}
    async with FakeBraze(config) as fake:
        for sent in range(10):
            answer = await post(session, fake, audience(sub))
            assert answer.status == 201
            assert answer.headers["x-ratelimit-limit"] == "10"
            assert answer.headers["x-ratelimit-remaining"] == str(9 - sent)
            assert answer.headers["x-ratelimit-reset"] == minute_end
        limited = await post(session, fake, audience(sub))
        assert (limited.status, limited.json) == (429, {"message": "Rate Limited"})
        # Same filters with keys in another order are the same audience.
        same = {"push_subscription_status": {"value": "opted_in", "comparison": "is"}}
        assert (await post(session, fake, audience(same))).status == 429
        # Another audience, and the same audience on another Canvas, have their own budgets.
        assert (await post(session, fake, audience({"AND": [sub]}))).status == 201
        assert (await post(session, fake, audience(sub, canvas_id="other"))).status == 201
        # Broadcasts do not spend the hourly recipient pool (limit 1 here).
        assert (await post(session, fake, body())).status == 201
        # 14 broadcasts so far; distinct audiences run into the per-key 25/min.
        statuses = [(await post(session, fake, audience(sub, canvas_id=f"c{i}"))).status for i in range(12)]
        assert statuses == [201] * 11 + [429]
        assert (await post(session, fake, audience(sub, canvas_id="c99"))).headers[
            "x-ratelimit-limit"
        ] == "25"
        clock.now += 60  # next minute: both budgets are fresh
        assert (await post(session, fake, audience(sub))).status == 201


# --- Faults -----------------------------------------------------------------------------------


async def test_scripted_faults_are_consumed_in_order(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    html = b"<html>bad gateway</html>"
    fake.faults.script(
        [Fault.status(503), Fault.status(502, body=html, content_type="text/html"), Fault.reset()]
    )
    unavailable = await post(session, fake, body())
    assert (unavailable.status, unavailable.json) == (503, {"message": "Service Unavailable"})
    bad_gateway = await post(session, fake, body())
    assert bad_gateway.status == 502
    assert bad_gateway.headers["Content-Type"].startswith("text/html")
    assert bad_gateway.text == html.decode()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, fake, body())
    assert (await post(session, fake, body())).status == 201  # script exhausted
    assert [call.status for call in fake.calls] == [503, 502, 0, 201]
    assert all(call.body == body() for call in fake.calls)  # faults still record the call


async def test_status_fault_applies_before_auth(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    fake.faults.script([Fault.status(500)])
    assert (await post(session, fake, body(), key="wrong")).status == 500


async def test_reset_reads_body_then_drops_and_next_request_works(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    fake.faults.script([Fault.reset()])
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, fake, body())
    (call,) = fake.calls
    assert (call.status, call.raw) == (0, json.dumps(body()).encode())
    assert (await post(session, fake, body())).status == 201


async def test_delay_answers_normally_after_the_delay(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    fake.faults.script([Fault.delay(0.2), Fault.delay_then_status(0.2, 504)])
    started = time.monotonic()
    assert (await post(session, fake, body())).status == 201
    assert time.monotonic() - started >= 0.19
    started = time.monotonic()
    assert (await post(session, fake, body())).status == 504
    assert time.monotonic() - started >= 0.19


async def test_delayed_request_times_out_on_the_client(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    fake.faults.script([Fault.delay(1.0)])
    url = f"{fake.url}/canvas/trigger/send"
    timeout = aiohttp.ClientTimeout(total=0.1)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(url, json=body(), timeout=timeout):
            pass


async def test_latency_applies_to_every_request(session: aiohttp.ClientSession, clock: Clock) -> None:
    config = FakeBrazeConfig(api_keys=frozenset({KEY}), latency_seconds=0.15, clock=clock)
    async with FakeBraze(config) as fake:
        for key in (KEY, "wrong"):
            started = time.monotonic()
            await post(session, fake, body(), key=key)
            assert time.monotonic() - started >= 0.14


@pytest.mark.parametrize(
    ("error_rates", "reset_rate", "expected"),
    [({503: 1.0}, 0.0, {503}), ({}, 1.0, {0}), ({500: 0.5, 502: 0.5}, 0.0, {500, 502})],
)
async def test_random_rates(
    session: aiohttp.ClientSession,
    clock: Clock,
    error_rates: dict[int, float],
    reset_rate: float,
    expected: set[int],
) -> None:
    config = FakeBrazeConfig(
        api_keys=frozenset({KEY}),
        error_rates=error_rates,
        reset_rate=reset_rate,
        seed=7,
        clock=clock,
    )
    async with FakeBraze(config) as fake:
        for _ in range(20):
            with contextlib.suppress(aiohttp.ClientConnectionError):
                await post(session, fake, body())
        assert {call.status for call in fake.calls} == expected


async def test_seeded_rates_repeat_exactly(session: aiohttp.ClientSession, clock: Clock) -> None:
    outcomes = []
    for _ in range(2):
        config = FakeBrazeConfig(api_keys=frozenset({KEY}), error_rates={503: 0.3}, seed=42, clock=clock)
        async with FakeBraze(config) as fake:
            outcomes.append([(await post(session, fake, body())).status for _ in range(30)])
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {201, 503}


# --- Admin API, keep-alive, lifecycle -----------------------------------------------------------


async def test_admin_faults_endpoint(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    spec = {
        "script": [
            {"status": 503},
            {"status": 502, "body": "<html>bad gateway</html>", "content_type": "text/html"},
            {"reset": True},
            {"delay_ms": 100},
        ],
        "rates": {"500": 0.1, "reset": 0.05},
        "latency_ms": 20,
    }
    async with session.post(f"{fake.url}/_fake/faults", json=spec) as resp:
        assert resp.status == 200
        state = await resp.json()
    assert [entry.get("status") for entry in state["script"]] == [503, 502, None, None]
    assert state["rates"] == {"500": 0.1, "reset": 0.05}
    assert state["latency_ms"] == 20
    async with session.delete(f"{fake.url}/_fake/faults") as resp:
        assert await resp.json() == {"script": [], "rates": {}, "latency_ms": 0}

    spec = {"script": [{"status": 503}, {"reset": True}, {"delay_ms": 50, "status": 429}]}
    async with session.post(f"{fake.url}/_fake/faults", json=spec) as resp:
        assert resp.status == 200
    assert (await post(session, fake, body())).status == 503
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, fake, body())
    assert (await post(session, fake, body())).status == 429
    assert (await post(session, fake, body())).status == 201


@pytest.mark.parametrize(
    "spec",
    [
        {"script": [{"status": 99}]},
        {"script": [{"status": "503"}]},
        {"script": [{"reset": True, "status": 503}]},
        {"script": [{"explode": True}]},
        {"script": [{}]},
        {"script": {"status": 503}},
        {"rates": {"503": 0.7, "500": 0.7}},
        {"rates": {"teapot": 0.1}},
        {"rates": {"503": -0.1}},
        {"latency_ms": "slow"},
        {"script": [{"status": 503}], "latency_ms": -5},
        {"unknown": 1},
        [1],
    ],
)
async def test_admin_rejects_bad_fault_specs_without_changing_state(
    session: aiohttp.ClientSession, fake: FakeBraze, spec: Any
) -> None:
    async with session.post(f"{fake.url}/_fake/faults", json=spec) as resp:
        assert resp.status == 400
        assert "message" in await resp.json()
    async with session.get(f"{fake.url}/_fake/faults") as resp:
        assert await resp.json() == {"script": [], "rates": {}, "latency_ms": 0}
    assert (await post(session, fake, body())).status == 201


async def test_admin_calls_redacts_key_and_clears(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    await post(session, fake, body())
    await post(session, fake, raw=b"junk", key="secret-wrong-key")
    await post(session, fake, body(), key=None)
    async with session.get(f"{fake.url}/_fake/calls") as resp:
        text = await resp.text()
    assert KEY not in text
    assert "secret-wrong-key" not in text
    calls = json.loads(text)["calls"]
    assert [call["status"] for call in calls] == [201, 401, 401]
    assert calls[0]["body"] == body()
    assert calls[0]["api_key"].startswith("sha256:")
    assert calls[0]["api_key"] != calls[1]["api_key"]
    assert calls[1]["raw"] == "junk"
    assert calls[2]["api_key"] is None  # no key sent
    async with session.delete(f"{fake.url}/_fake/calls") as resp:
        assert await resp.json() == {"cleared": 3}
    assert fake.calls == []
    async with session.get(f"{fake.url}/_fake/calls") as resp:
        assert await resp.json() == {"calls": []}


async def test_record_off_keeps_counters_only(session: aiohttp.ClientSession, clock: Clock) -> None:
    config = FakeBrazeConfig(api_keys=frozenset({KEY}), record=False, clock=clock)
    async with FakeBraze(config) as fake:
        await post(session, fake, body())
        assert fake.calls == []
        assert (fake.status_counts[201], fake.recipients_sent) == (1, 1)


async def test_keep_alive_reuses_one_connection(fake: FakeBraze) -> None:
    created = 0

    async def on_create(*_: Any) -> None:
        nonlocal created
        created += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    async with aiohttp.ClientSession(trace_configs=[trace]) as client:
        for _ in range(5):
            assert (await post(client, fake, body())).status == 201
        assert (await post(client, fake, body(canvas_id=""))).status == 400
        assert (await post(client, fake, body(), key="wrong")).status == 401
        assert (await post(client, fake, body())).status == 201
    assert created == 1


async def test_unknown_path_and_wrong_method(session: aiohttp.ClientSession, fake: FakeBraze) -> None:
    async with session.get(f"{fake.url}/canvas/trigger/send") as resp:
        assert resp.status == 405
    async with session.post(f"{fake.url}/campaigns/trigger/send", json=body()) as resp:
        assert resp.status == 404
    assert fake.calls == []


async def test_lifecycle(config: FakeBrazeConfig) -> None:
    fake = FakeBraze(config)
    url = await fake.start()
    assert url.startswith("http://127.0.0.1:")
    assert fake.url == url
    with pytest.raises(RuntimeError):
        await fake.start()
    await fake.stop()
    await fake.stop()


async def test_app_can_be_embedded(session: aiohttp.ClientSession, config: FakeBrazeConfig) -> None:
    fake = FakeBraze(config)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"{site.name}/canvas/trigger/send"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with session.post(url, json=body(), headers=headers) as resp:
            assert resp.status == 201
    finally:
        await runner.cleanup()
    assert [call.status for call in fake.calls] == [201]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"api_keys": frozenset()},
        {"api_keys": "key"},
        {"api_keys": frozenset({""})},
        {"api_keys": frozenset({KEY}), "hourly_limit": -1},
        {"api_keys": frozenset({KEY}), "hourly_window_seconds": 0},
        {"api_keys": frozenset({KEY}), "hourly_window_seconds": 7200},
        {"api_keys": frozenset({KEY}), "error_rates": {503: 0.8}, "reset_rate": 0.3},
        {"api_keys": frozenset({KEY}), "latency_seconds": -1},
        {"api_keys": frozenset({KEY}), "keys_without_permission": frozenset({KEY})},
        {"api_keys": frozenset({KEY}), "canvases": frozenset({"c"}), "other_canvases": frozenset({"c"})},
        {
            "api_keys": frozenset({KEY}),
            "paused_canvases": frozenset({"c"}),
            "other_canvases": frozenset({"c"}),
        },
    ],
)
def test_config_fails_fast(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"."):
        FakeBrazeConfig(**kwargs)


# --- Command line ------------------------------------------------------------------------------


def test_cli_refuses_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--host", "0.0.0.0", "--api-key", KEY])
    assert exc.value.code == 2
    assert "--allow-remote" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True)],
        *[("0.0.0.0", False), ("10.0.0.1", False), ("::", False), ("example.com", False)],
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_cli_builds_config_from_flags() -> None:
    from fake_braze.__main__ import build_parser

    flags = "--api-key a --api-key b --paused-canvas p --archived-canvas x --hourly-limit 9"
    rates = "--hourly-window-seconds 5 --latency-ms 20 --error-rate 503=0.1 --error-rate 500=0.2"
    args = build_parser().parse_args([*flags.split(), *rates.split(), "--reset-rate", "0.05", "--seed", "3"])
    config = config_from_args(args)
    assert config.api_keys == {"a", "b"}
    assert config.paused_canvases == {"p"}
    assert config.archived_canvases == {"x"}
    assert (config.hourly_limit, config.hourly_window_seconds) == (9, 5)
    assert (config.latency_seconds, config.seed) == (0.02, 3)
    assert build_parser().parse_args(["--api-key", "a"]).hourly_window_seconds == 3600  # the clock hour
    assert (dict(config.error_rates), config.reset_rate) == ({503: 0.1, 500: 0.2}, 0.05)
    assert config.canvases is None  # any canvas id is an API-triggered one
    known = "--api-key a --key-without-permission n --canvas c1 --canvas c2 --other-canvas s"
    config = config_from_args(build_parser().parse_args(known.split()))
    assert config.keys_without_permission == {"n"} and config.other_canvases == {"s"}
    assert config.canvases == frozenset({"c1", "c2"})


def test_docs_name_every_key_and_canvas_flag_and_no_other() -> None:
    """docs/fake-braze.md lists each flag that gives a key or canvas a role, and every flag it
    mentions exists."""
    from fake_braze.__main__ import build_parser

    page = (Path(__file__).resolve().parents[2] / "docs" / "fake-braze.md").read_text()
    section = page.split("# The fake Braze\n", 1)[1]
    actions = build_parser()._actions
    roles = {flag for a in actions if a.metavar in ("KEY", "ID") for flag in a.option_strings}
    assert roles >= {"--api-key", "--key-without-permission", "--canvas", "--other-canvas"}
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", section)) - {"--demo"}  # the gateway's
    assert roles <= mentioned
    assert mentioned <= {flag for a in actions for flag in a.option_strings}


def test_cli_rejects_bad_error_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--api-key", KEY, "--error-rate", "503"])
    with pytest.raises(SystemExit):
        main(["--api-key", KEY, "--error-rate", "503=0.9", "--reset-rate", "0.5"])
    assert "error" in capsys.readouterr().err


async def test_cli_serves_until_sigterm(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fake_braze",
        "--port",
        "0",
        "--api-key",
        KEY,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        url = line.rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        headers = {"Authorization": f"Bearer {KEY}"}
        async with session.post(f"{url}/canvas/trigger/send", json=body(), headers=headers) as r:
            assert r.status == 201
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    "recipient",
    [
        {"user_alias": {"alias_name": "n", "alias_label": "l"}, "send_to_existing_only": True},
        {
            "user_alias": {"alias_name": "n", "alias_label": "l"},
            "send_to_existing_only": False,
            "attributes": {"a": 1},
        },
    ],
)
def test_send_to_existing_only_is_refused_with_any_alias(recipient: dict[str, object]) -> None:
    rejection = rules.check_recipient(recipient)
    assert rejection is not None
    status, message = rejection
    assert status == 400
    assert "send_to_existing_only" in message


@pytest.mark.parametrize(("value", "accepted"), LAST_USED_APP_TIMES)
def test_last_used_app_needs_an_iso_datetime_with_a_zone(value: str, accepted: bool) -> None:
    audience = {"last_used_app": {"comparison": "after", "value": value}}
    assert (rules.check_audience(audience) is None) is accepted


KNOWN = "api-triggered-canvas"
SCHEDULED = "scheduled-canvas"
NO_PERMISSION = "key-without-permission"


@pytest.fixture
def strict_config(config: FakeBrazeConfig) -> FakeBrazeConfig:
    """The usual workspace, with a key lacking the permission and only known canvases."""
    return dataclasses.replace(
        config,
        keys_without_permission=frozenset({NO_PERMISSION}),
        canvases=frozenset({KNOWN}),
        other_canvases=frozenset({SCHEDULED}),
    )


@pytest.fixture
async def strict(strict_config: FakeBrazeConfig) -> AsyncIterator[FakeBraze]:
    async with FakeBraze(strict_config) as running:
        yield running


@pytest.mark.parametrize(
    ("canvas_id", "status", "text"),
    [
        (KNOWN, 201, "success"),
        ("paused-canvas", 201, "success"),  # paused canvases are known ones
        (SCHEDULED, 400, f"Canvas {SCHEDULED} does not use API-triggered delivery"),
        ("no-such-canvas", 400, "canvas_id must be a string of the Canvas api identifier"),
    ],
)
async def test_only_known_api_triggered_canvases_are_triggered(
    session: aiohttp.ClientSession, strict: FakeBraze, canvas_id: str, status: int, text: str
) -> None:
    answer = await post(session, strict, body(canvas_id=canvas_id))
    assert (answer.status, answer.json["message"]) == (status, text)


async def test_by_default_any_canvas_id_is_a_known_one(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    assert (await post(session, fake, body(canvas_id="anything-at-all"))).status == 201


async def test_a_key_without_the_permission_is_403_after_authentication(
    session: aiohttp.ClientSession, strict: FakeBraze
) -> None:
    denied = await post(session, strict, body(canvas_id=KNOWN), key=NO_PERMISSION)
    assert (denied.status, denied.json) == (403, {"message": "Access Denied"})
    assert all(denied.headers[name] == "" for name in LIMIT_HEADERS)  # as on a 401 (point 28)
    bad_body = await post(session, strict, {"canvas_id": KNOWN}, key=NO_PERMISSION)
    assert bad_body.status == 403  # the permission is checked before the body
    assert (await post(session, strict, body(canvas_id=KNOWN), key="unknown")).status == 401
    assert NO_PERMISSION not in (await post(session, strict, body(canvas_id=KNOWN), key=NO_PERMISSION)).text


async def test_checks_run_in_order(
    session: aiohttp.ClientSession, strict_config: FakeBrazeConfig, clock: Clock
) -> None:
    """Size, routing, key, permission, rate limit, body, canvas: each answer names the first failure.

    Each step repairs one more fault of the request; a check that moved later would answer first."""
    invalid = {"canvas_id": "no-such-canvas"}  # no recipients, and an unknown canvas
    async with FakeBraze(dataclasses.replace(strict_config, hourly_limit=1)) as fake:
        too_large = await post(session, fake, raw=b"x" * (MAX_BODY_BYTES + 1), key="unknown")
        assert (too_large.status, set(too_large.json)) == (413, {"message"})
        async with session.post(f"{fake.url}/canvas/trigger/nope", json=invalid) as resp:
            assert (resp.status, set(await resp.json())) == (404, {"message"})  # no key sent
        assert (await post(session, fake, invalid, key="unknown")).status == 401
        for _ in range(2):  # twice: past the hourly budget of 1, still 403, never 429
            assert (await post(session, fake, invalid, key=NO_PERMISSION)).status == 403
        assert (await post(session, fake, body(canvas_id=KNOWN))).status == 201  # spends the hour
        assert (await post(session, fake, invalid)).status == 429
        clock.now += 3600
        refused = await post(session, fake, invalid)
        assert refused.status == 400 and "recipients" in refused.json["message"]
        clock.now += 3600
        unknown = await post(session, fake, body(canvas_id="no-such-canvas"))
        assert unknown.json == {"message": "canvas_id must be a string of the Canvas api identifier"}
        clock.now += 3600
        assert (await post(session, fake, body(canvas_id=KNOWN))).status == 201
        assert [call.status for call in fake.calls] == [413, 401, 403, 403, 201, 429, 400, 400, 201]


async def test_in_progress_counts_requests_not_yet_answered(
    session: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """A request whose body is still arriving is in progress; once answered it is not."""
    release = asyncio.Event()
    payload = json.dumps(body()).encode()

    async def slow_body() -> AsyncIterator[bytes]:
        yield payload[:10]
        await release.wait()
        yield payload[10:]

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    async def send() -> int:
        url = f"{fake.url}/canvas/trigger/send"
        async with session.post(url, data=slow_body(), headers=headers) as resp:
            return resp.status

    task = asyncio.create_task(send())
    for _ in range(1000):  # bounded wait on the state itself
        if fake.in_progress == 1:
            break
        await asyncio.sleep(0.005)
    assert (fake.in_progress, fake.calls) == (1, [])
    release.set()
    assert await task == 201
    assert fake.in_progress == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/canvas/trigger/send", 405),
        ("POST", "/canvas/trigger/nope", 404),
        ("GET", "/", 404),
        ("PUT", "/_fake/faults", 405),
        ("POST", "/_fake/calls", 405),
        ("GET", "/_fake/stats", 404),  # the admin API is faults and calls, nothing else
    ],
)
async def test_unknown_paths_and_methods_answer_in_brazes_json_shape(
    session: aiohttp.ClientSession, fake: FakeBraze, method: str, path: str, status: int
) -> None:
    async with session.request(method, f"{fake.url}{path}") as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert set(await resp.json()) == {"message"}
