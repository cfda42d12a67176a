"""Other consumers of a key's pools (issue 19): a share of each window, a steady rate, a burst,
through the admin API and the CLI, and the `/_fake/budget` view that tells the fake's requests from
their spending. Through real HTTP on 127.0.0.1, on the fake's injected clock."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from fake_braze import ConsumerError, FakeBraze, FakeBrazeConfig, OtherConsumer
from fake_braze.__main__ import build_parser, config_from_args, main
from fake_braze.consumers import from_spec
from support import KEYS, Harness, standing_clock

KEY = "test-key"
OTHER_KEY = "other-key"
START = 1_750_190_400.0  # 2025-06-17T20:00:00Z: a 5-second, minute and hour window starts here
RECIPIENT = {"canvas_id": "c", "recipients": [{"external_user_id": "u"}]}
BROADCAST = {"canvas_id": "c", "broadcast": True}
STILL = standing_clock()
"""For a test with the gateway: the fake's windows and the gateway's clock stand still."""


class Clock:
    """A settable clock for the fake's windows."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


def short_windows(clock: Clock, **fields: Any) -> FakeBrazeConfig:
    """Two keys, 10 recipient calls per 5-second window."""
    settings: dict[str, Any] = {"hourly_limit": 10, "hourly_window_seconds": 5, **fields}
    return FakeBrazeConfig(api_keys=frozenset({KEY, OTHER_KEY}), clock=clock, **settings)


async def trigger(
    session: aiohttp.ClientSession, fake: FakeBraze, payload: Any = None, key: str = KEY
) -> tuple[int, int]:
    """POST one call; its status and `x-ratelimit-remaining`."""
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{fake.url}/canvas/trigger/send"
    async with session.post(url, json=payload or RECIPIENT, headers=headers) as resp:
        return resp.status, int(resp.headers["x-ratelimit-remaining"])


async def admin(
    session: aiohttp.ClientSession, fake: FakeBraze, method: str, path: str, payload: Any = None
) -> tuple[int, Any]:
    async with session.request(method, f"{fake.url}/_fake/{path}", json=payload) as resp:
        return resp.status, await resp.json()


async def windows(session: aiohttp.ClientSession, fake: FakeBraze, pool: str = "hourly") -> list[Any]:
    status, view = await admin(session, fake, "GET", "budget")
    assert status == 200
    return [window for window in view["windows"] if window["pool"] == pool]


def consumers(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"consumers": list(entries)}


# --- a share of each window ---------------------------------------------------------------------


async def test_a_share_is_taken_as_each_window_starts(session: aiohttp.ClientSession, clock: Clock) -> None:
    async with FakeBraze(short_windows(clock)) as fake:
        status, shown = await admin(
            session, fake, "PUT", "consumers", consumers({"api_key": KEY, "share": 0.3})
        )
        assert status == 200
        (entry,) = shown["consumers"]
        assert entry == {"api_key": entry["api_key"], "pool": "hourly", "share": 0.3, "per_second": 0.0}
        assert entry["api_key"].startswith("sha256:") and KEY not in json.dumps(shown)

        answers = [await trigger(session, fake) for _ in range(8)]
        assert answers == [(201, left) for left in range(6, -1, -1)] + [(429, 0)]  # 3 of 10 taken
        assert await trigger(session, fake, key=OTHER_KEY) == (201, 9)  # another key: untouched

        clock.now = START + 5  # the next window: they take their 3 again
        assert await trigger(session, fake) == (201, 6)
        kept = await windows(session, fake)
        closed, current = (window for window in kept if window["api_key"] == entry["api_key"])
        assert closed == {
            "pool": "hourly",
            "api_key": entry["api_key"],
            "start": int(START),
            "reset": int(START) + 5,
            "open": False,
            "limit": 10,
            "remaining": 0,
            "requests": 7,
            "requests_refused": 1,
            "others": 3,
            "others_refused": 0,
        }
        assert (current["open"], current["start"], current["requests"], current["others"]) == (
            True,
            int(START) + 5,
            1,
            3,
        )
        # The other key's window closed too, with nothing spent by others.
        (other,) = (window for window in kept if window["api_key"] != entry["api_key"])
        assert (other["requests"], other["others"], other["open"]) == (1, 0, False)


async def test_a_steady_rate_spends_with_the_clock(session: aiohttp.ClientSession, clock: Clock) -> None:
    config = FakeBrazeConfig(api_keys=frozenset({KEY}), hourly_limit=100, clock=clock)
    async with FakeBraze(config) as fake:
        clock.now = START + 1800  # set in the middle of the hour: the rate counts from now
        spec = consumers({"api_key": KEY, "per_second": 2})
        assert (await admin(session, fake, "PUT", "consumers", spec))[0] == 200
        clock.now += 10
        assert await trigger(session, fake) == (201, 79)  # 20 theirs, 1 ours
        clock.now += 0.4  # 20.8 calls due: still 20
        assert await trigger(session, fake) == (201, 78)
        clock.now += 0.1
        assert await trigger(session, fake) == (201, 76)
        clock.now += 100  # they want 200 in all, and get what is left: 76
        (window,) = await windows(session, fake)
        assert (window["requests"], window["others"], window["others_refused"]) == (3, 97, 124)
        assert await trigger(session, fake) == (429, 0)


async def test_a_closed_window_holds_what_a_steady_consumer_spent_until_its_end(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    config = short_windows(clock, hourly_limit=100, other_consumers=(OtherConsumer(KEY, per_second=3),))
    async with FakeBraze(config) as fake:
        clock.now = START + 1
        assert await trigger(session, fake) == (201, 96)
        clock.now = START + 7  # two windows on, no call in between
        assert await trigger(session, fake) == (201, 93)
        closed, current = await windows(session, fake)
        assert (closed["others"], closed["requests"], closed["open"]) == (15, 1, False)  # 3/s for 5 s
        assert (current["others"], current["requests"], current["open"]) == (6, 1, True)


async def test_looking_does_not_change_what_they_spend(session: aiohttp.ClientSession) -> None:
    """The spending is worked out lazily: a view at any moment leaves the outcome as it was."""

    async def run(look: bool) -> list[Any]:
        clock = Clock(START)
        others = (OtherConsumer(KEY, share=0.2, per_second=1.5),)
        answers: list[Any] = []
        async with FakeBraze(short_windows(clock, other_consumers=others)) as fake:
            for step in range(40):
                clock.now = START + step * 0.35
                if look:
                    await windows(session, fake)
                answers.append(await trigger(session, fake))
            answers.append(await windows(session, fake))
        return answers

    looked, unseen = await run(look=True), await run(look=False)
    assert looked == unseen
    assert sum(window["others_refused"] for window in unseen[-1]) > 0  # the gateway took their part


async def test_the_fakes_requests_plus_theirs_never_exceed_the_limit(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    """Twenty windows of calls racing a consumer taking 30% and a steady rate, with bursts."""
    rng = random.Random(19)
    others = (OtherConsumer(KEY, share=0.3, per_second=2),)
    async with FakeBraze(short_windows(clock, hourly_limit=20, other_consumers=others)) as fake:
        seen_remaining: list[int] = []
        while clock.now < START + 100:
            clock.now += rng.uniform(0, 0.3)
            if rng.random() < 0.05:
                status, spent = await admin(session, fake, "POST", "burst", {"api_key": KEY, "calls": 3})
                assert status == 200 and spent["spent"] + spent["refused"] == 3
            status, remaining = await trigger(session, fake)
            assert status in (201, 429)
            seen_remaining.append(remaining)
        kept = await windows(session, fake)
    assert len(kept) >= 20
    for window in kept:
        assert window["requests"] + window["others"] <= window["limit"] == 20
        assert window["remaining"] == window["limit"] - window["requests"] - window["others"]
        if window["open"]:
            continue
        assert window["others"] >= 6  # their 30% came first, every window
        if window["requests_refused"]:
            assert window["remaining"] == 0
    assert min(seen_remaining) == 0 < max(seen_remaining) <= 13  # 20 - 6 - 1 at best


@pytest.mark.parametrize(
    ("fake_config", "clock"),
    [
        (
            FakeBrazeConfig(
                api_keys=frozenset(KEYS.values()),
                hourly_limit=10,
                other_consumers=(OtherConsumer(KEYS["globex"], share=0.3),),
                clock=STILL,
            ),
            STILL,
        )
    ],
)
@pytest.mark.parametrize("settings_overrides", [{"max_retry_wait_seconds": 0.5, "request_concurrency": 1}])
async def test_the_gateway_sees_what_others_spent(harness: Harness) -> None:
    """The gateway reads their part from `x-ratelimit-remaining`: it sends 7 calls of 10, not 10."""
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(500)]
    request = pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=recipients))
    reply = await harness.stub.Send(request, metadata=harness.auth("globex"))
    assert [r.outcome for r in reply.results] == [pb.OUTCOME_SENT] * 7 + [pb.OUTCOME_REJECTED] * 3
    ((pool, window),) = harness.fake.limiter.budget()
    assert (pool, window.limit, window.tally.requests, window.tally.others) == ("hourly", 10, 7, 3)
    assert window.tally.others_refused == 0  # they took their 30% first; nothing of theirs was refused


# --- bursts, the broadcast pool, the audience reading -------------------------------------------


async def test_a_burst_spends_now_and_is_refused_past_the_limit(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    async with FakeBraze(short_windows(clock)) as fake:
        assert await admin(session, fake, "POST", "burst", {"api_key": KEY, "calls": 4}) == (
            200,
            {"spent": 4, "refused": 0},
        )
        assert await trigger(session, fake) == (201, 5)
        assert await admin(
            session, fake, "POST", "burst", {"api_key": KEY, "calls": 9, "pool": "hourly"}
        ) == (
            200,
            {"spent": 5, "refused": 4},
        )
        assert await trigger(session, fake) == (429, 0)
        (window,) = await windows(session, fake)
        assert (window["others"], window["others_refused"], window["requests_refused"]) == (9, 4, 1)
        clock.now = START + 5  # a burst is once: the next window is whole
        assert await trigger(session, fake) == (201, 9)


async def test_the_broadcast_pool_is_spent_apart_from_the_hourly(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    others = (OtherConsumer(KEY, pool="broadcast", share=0.5),)
    config = short_windows(clock, broadcast_per_minute=10, other_consumers=others)
    async with FakeBraze(config) as fake:
        assert await trigger(session, fake, BROADCAST) == (201, 4)  # 5 theirs; the audience has 9
        assert await trigger(session, fake) == (201, 9)  # the hourly pool is whole
        assert await admin(
            session, fake, "POST", "burst", {"api_key": KEY, "calls": 4, "pool": "broadcast"}
        ) == (
            200,
            {"spent": 4, "refused": 0},
        )
        assert await trigger(session, fake, BROADCAST) == (429, 0)
        (window,) = await windows(session, fake, "broadcast")
        assert (window["limit"], window["requests"], window["others"], window["reset"]) == (
            10,
            1,
            9,
            int(START) + 60,
        )


@pytest.mark.parametrize(("on_broadcast", "limit"), [(None, 2), (True, 2), (False, 10)])
async def test_a_call_with_an_audience_and_recipients_is_on_the_broadcast_budgets_by_default(
    session: aiohttp.ClientSession, clock: Clock, on_broadcast: bool | None, limit: int
) -> None:
    """As the gateway's tenants read it by default (`any_audience`, CONTRACT.md point 21)."""
    reading = {} if on_broadcast is None else {"audience_calls_on_broadcast_budget": on_broadcast}
    config = short_windows(clock, broadcast_per_minute_per_audience=2, **reading)
    audience = {"push_subscription_status": {"comparison": "is", "value": "opted_in"}}
    async with FakeBraze(config) as fake:
        headers = {"Authorization": f"Bearer {KEY}"}
        url = f"{fake.url}/canvas/trigger/send"
        async with session.post(url, json={**RECIPIENT, "audience": audience}, headers=headers) as resp:
            assert (resp.status, resp.headers["x-ratelimit-limit"]) == (201, str(limit))


# --- the admin API and the command line ---------------------------------------------------------


async def test_consumers_are_replaced_kept_and_cleared(session: aiohttp.ClientSession, clock: Clock) -> None:
    async with FakeBraze(short_windows(clock, hourly_limit=100)) as fake:
        spec = consumers(
            {"api_key": KEY, "share": 0.1}, {"api_key": OTHER_KEY, "pool": "broadcast", "share": 1}
        )
        assert (await admin(session, fake, "PUT", "consumers", spec))[0] == 200
        assert await trigger(session, fake) == (201, 89)
        assert (await admin(session, fake, "PUT", "consumers", spec))[0] == 200  # unchanged: carries on
        assert await trigger(session, fake) == (201, 88)
        changed = consumers({"api_key": KEY, "share": 0.2})
        status, shown = await admin(session, fake, "PUT", "consumers", changed)
        assert (status, [c["share"] for c in shown["consumers"]]) == (200, [0.2])
        assert await trigger(session, fake) == (201, 67)  # a new consumer takes its share at once
        assert await admin(session, fake, "DELETE", "consumers") == (200, {"consumers": []})
        clock.now = START + 5
        assert await trigger(session, fake) == (201, 99)
        status, view = await admin(session, fake, "DELETE", "budget")
        assert (status, view) == (200, {"windows": []})
        assert await trigger(session, fake) == (201, 99)  # counts forgotten: a whole window again


@pytest.mark.parametrize(
    "spec",
    [
        [1],
        {"consumers": {"api_key": KEY, "share": 0.1}},
        {"consumers": [], "extra": 1},
        {"consumers": ["x"]},
        consumers({"share": 0.1}),
        consumers({"api_key": KEY}),
        consumers({"api_key": KEY, "share": 1.5}),
        consumers({"api_key": KEY, "share": -0.1}),
        consumers({"api_key": KEY, "share": "0.3"}),
        consumers({"api_key": KEY, "share": True}),
        consumers({"api_key": KEY, "per_second": float("inf")}),
        consumers({"api_key": KEY, "share": 0.1, "pool": "daily"}),
        consumers({"api_key": KEY, "share": 0.1, "burst": 3}),
        consumers({"api_key": "unknown-key", "share": 0.1}),
        consumers({"api_key": "", "share": 0.1}),
        consumers({"api_key": KEY, "share": 0.1}, {"api_key": KEY, "per_second": 1}),
    ],
)
async def test_bad_consumers_are_refused_and_change_nothing(
    session: aiohttp.ClientSession, clock: Clock, spec: Any
) -> None:
    async with FakeBraze(short_windows(clock, other_consumers=(OtherConsumer(KEY, share=0.5),))) as fake:
        status, answer = await admin(session, fake, "PUT", "consumers", spec)
        assert status == 400 and answer["message"]
        assert "unknown-key" not in answer["message"]
        status, shown = await admin(session, fake, "GET", "consumers")
        assert [(c["share"], c["pool"]) for c in shown["consumers"]] == [(0.5, "hourly")]
    async with (
        FakeBraze(short_windows(clock)) as fake,
        session.put(f"{fake.url}/_fake/consumers", data=b"not json") as resp,
    ):
        assert resp.status == 400


@pytest.mark.parametrize(
    "spec",
    [
        {"api_key": KEY},
        {"calls": 3},
        {"api_key": KEY, "calls": 0},
        {"api_key": KEY, "calls": 2.5},
        {"api_key": KEY, "calls": True},
        {"api_key": KEY, "calls": 3, "pool": "daily"},
        {"api_key": KEY, "calls": 3, "share": 0.1},
        {"api_key": "unknown-key", "calls": 3},
        {"api_key": ["list"], "calls": 3},
        [KEY, 3],
    ],
)
async def test_bad_bursts_are_refused_and_spend_nothing(
    session: aiohttp.ClientSession, clock: Clock, spec: Any
) -> None:
    async with FakeBraze(short_windows(clock)) as fake:
        status, answer = await admin(session, fake, "POST", "burst", spec)
        assert status == 400 and answer["message"]
        assert await trigger(session, fake) == (201, 9)


def test_the_command_line_sets_consumers_and_the_audience_reading() -> None:
    args = build_parser().parse_args(
        [
            *("--api-key", "a", "--api-key", "b"),
            *("--other-consumer", "api_key=a,share=0.3"),
            *("--other-consumer", "api_key=b,pool=broadcast,per_second=2.5,share=0"),
            *("--audience-budget", "broadcast_only"),
        ]
    )
    config = config_from_args(args)
    assert config.other_consumers == (
        OtherConsumer("a", "hourly", share=0.3),
        OtherConsumer("b", "broadcast", per_second=2.5),
    )
    assert config.audience_calls_on_broadcast_budget is False
    assert config_from_args(build_parser().parse_args(["--api-key", "a"])).audience_calls_on_broadcast_budget


@pytest.mark.parametrize(
    "spec",
    [
        "share=0.3",
        "api_key=a",
        "api_key=a,share=lots",
        "api_key=a,per_second=x",
        "api_key=a,share=0.3,share=0.4",
        "api_key=a,burst=3",
        "api_key=a;share=0.3",
        "api_key=a,pool=daily,share=0.3",
    ],
)
def test_the_command_line_refuses_a_bad_consumer(capsys: pytest.CaptureFixture[str], spec: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--api-key", "a", "--other-consumer", spec])
    assert exc.value.code == 2
    assert "--other-consumer" in capsys.readouterr().err
    with pytest.raises(ConsumerError):
        from_spec(spec)


def test_the_command_line_refuses_a_consumer_on_an_unknown_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--api-key", "a", "--other-consumer", "api_key=b,share=0.3"])
    assert exc.value.code == 2
    assert "not one of the fake's keys" in capsys.readouterr().err


@pytest.mark.parametrize(
    "others",
    [
        (OtherConsumer(OTHER_KEY, share=0.1),),
        (OtherConsumer(KEY, share=0.1), OtherConsumer(KEY, per_second=1)),
    ],
)
def test_config_refuses_consumers_it_cannot_model(others: tuple[OtherConsumer, ...]) -> None:
    with pytest.raises(ValueError, match="consumer"):
        FakeBrazeConfig(api_keys=frozenset({KEY}), other_consumers=others)
