"""The Python client and the `canvas-gateway` CLI against a real gateway and the fake Braze."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest
from canvas_gateway_client import (
    CanvasGatewayClient,
    FieldViolation,
    Waiting,
    bad_request_violations,
    pb,
    to_trigger,
)
from canvas_gateway_client.cli import main, run
from canvas_gateway_client.console import Console, Report
from canvas_gateway_client.report import COLUMNS, Progress, Reasons, reason
from fake_braze import PAUSED_NOTICE, FakeBrazeConfig
from google.protobuf import json_format
from support import EXAMPLES, KEYS, TOKENS, Harness, example, trigger_from_json

TIMEOUT = 30.0
TOKEN = TOKENS["acme"]
CANVAS = "8c7c2864-26b2-4ad0-97ec-48cddfd497d7"


def client_for(harness: Harness, tenant: str = "acme") -> CanvasGatewayClient:
    return CanvasGatewayClient(harness.target, TOKENS[tenant])


def recipients(count: int) -> Iterator[dict[str, Any]]:
    for n in range(count):
        yield {"external_user_id": f"user-{n}", "context": {"n": n}}


async def drain(stream: AsyncIterator[pb.SendStreamResponse], into: list[pb.SendStreamResponse]) -> None:
    async for response in stream:
        into.append(response)


def positions(results: list[pb.BatchResult]) -> list[int]:
    return sorted(p for result in results for p in result.positions)


# --- client: Send -------------------------------------------------------------


async def test_send_posts_an_example_body(harness: Harness) -> None:
    body = example("recipients_external_ids.json")
    async with client_for(harness) as client:
        response = await client.send(body, timeout=TIMEOUT)

    assert [r.outcome for r in response.results] == [pb.OUTCOME_SENT]
    assert response.results[0].braze.dispatch_id
    assert response.summary.recipients_sent == 2
    [call] = harness.fake.calls
    assert call.api_key == KEYS["acme"]
    assert call.body["canvas_id"] == body["canvas_id"]
    assert [r["external_user_id"] for r in call.body["recipients"]] == ["user-48213", "user-51007"]


async def test_send_takes_a_message_and_validate_only_sends_nothing(harness: Harness) -> None:
    trigger = trigger_from_json(example("kitchen_sink.json"))  # an audience: globex only
    async with client_for(harness, "globex") as client:
        response = await client.send(trigger, validate_only=True, timeout=TIMEOUT)

    assert [r.outcome for r in response.results] == [pb.OUTCOME_NOT_ATTEMPTED]
    assert response.summary.recipients_not_attempted == 3
    assert harness.fake.calls == []


async def test_bad_request_violations_name_the_field(harness: Harness) -> None:
    body = {"canvas_id": CANVAS, "recipients": [{"email": "jordan.lee@example.com"}]}
    async with client_for(harness) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.send(body, timeout=TIMEOUT)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request_violations(raised.value)
    assert [v.field for v in violations] == ["recipients[0].prioritization"]
    assert isinstance(violations[0], FieldViolation)
    assert violations[0] == ("recipients[0].prioritization", violations[0].description)
    assert harness.fake.calls == []


async def test_violations_are_empty_without_bad_request_details(harness: Harness) -> None:
    async with CanvasGatewayClient(harness.target, "not-a-known-token") as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.send(example("recipients_alias.json"), timeout=TIMEOUT)

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert bad_request_violations(raised.value) == []
    assert "not-a-known-token" not in str(raised.value) + repr(raised.value)


def test_the_token_stays_out_of_repr_and_errors() -> None:
    client = CanvasGatewayClient("127.0.0.1:1", TOKEN)
    assert TOKEN not in repr(client)
    assert TOKEN not in str(vars(client).get("_target"))
    with pytest.raises(ValueError, match="token") as raised:
        CanvasGatewayClient("127.0.0.1:1", "secret with spaces")
    assert "secret" not in str(raised.value)


def test_a_body_with_an_unknown_field_does_not_parse() -> None:
    with pytest.raises(json_format.ParseError, match="trigger_properties"):
        to_trigger({"canvas_id": CANVAS, "trigger_properties": {}})


# --- client: SendStream -------------------------------------------------------


async def test_send_stream_reports_every_position_once(harness: Harness) -> None:
    async with client_for(harness) as client:
        responses = [
            response
            async for response in client.send_stream(
                {"canvas_id": CANVAS, "context": {"shared": True}},
                recipients(1234),
                chunk_size=100,
                timeout=TIMEOUT,
            )
        ]

    *results, last = responses
    assert all(r.WhichOneof("part") == "result" for r in results)
    assert last.WhichOneof("part") == "summary"
    batches = [r.result for r in results]
    assert len(batches) == 25
    assert positions(batches) == list(range(1234))
    assert {b.outcome for b in batches} == {pb.OUTCOME_SENT}
    assert last.summary.recipients == last.summary.recipients_sent == 1234
    assert last.summary.batches == 25
    assert sum(len(call.body["recipients"]) for call in harness.fake.calls) == 1234


async def test_send_stream_header_recipients_come_first(harness: Harness) -> None:
    header = example("recipients_alias.json")  # two recipients of its own
    async with client_for(harness) as client:
        responses = [
            r async for r in client.send_stream(header, recipients(3), chunk_size=2, timeout=TIMEOUT)
        ]

    [result, summary] = responses
    assert list(result.result.positions) == [0, 1, 2, 3, 4]
    assert summary.summary.recipients_sent == 5
    [call] = harness.fake.calls
    assert "user_alias" in call.body["recipients"][0]
    assert call.body["recipients"][4]["external_user_id"] == "user-2"


async def test_send_stream_reads_recipients_lazily(harness: Harness) -> None:
    """The source blocks until a result has arrived: a client that drained it first would hang."""
    first_result = asyncio.Event()
    pulled = 0

    async def gated() -> AsyncIterator[pb.Recipient]:
        nonlocal pulled
        for n in range(500):
            if n == 50:
                await first_result.wait()
            pulled += 1
            yield pb.Recipient(external_user_id=f"user-{n}")

    pulled_at_first_result = -1
    seen: list[pb.BatchResult] = []
    async with asyncio.timeout(TIMEOUT), client_for(harness) as client:
        async for response in client.send_stream({"canvas_id": CANVAS}, gated(), chunk_size=50):
            if response.HasField("result"):
                if not seen:
                    pulled_at_first_result = pulled
                    first_result.set()
                seen.append(response.result)

    assert pulled_at_first_result == 50
    assert pulled == 500
    assert positions(seen) == list(range(500))


async def test_send_stream_rejects_an_invalid_recipient_alone(harness: Harness) -> None:
    items: list[dict[str, Any]] = [
        {"external_user_id": "user-0"},
        {"email": "sam.patel@example.com"},
        {"external_user_id": "user-2"},
    ]
    async with client_for(harness) as client:
        responses = [r async for r in client.send_stream({"canvas_id": CANVAS}, items, timeout=TIMEOUT)]

    results = {r.result.outcome: r.result for r in responses if r.HasField("result")}
    rejected = results[pb.OUTCOME_REJECTED]
    assert list(rejected.positions) == [1]
    assert [v.field for v in rejected.violations] == ["recipients[1].prioritization"]
    assert list(results[pb.OUTCOME_SENT].positions) == [0, 2]


async def test_a_failing_source_drains_the_stream_then_raises(harness: Harness) -> None:
    def failing() -> Iterator[dict[str, Any]]:
        yield from recipients(60)
        raise RuntimeError("source broke")

    seen: list[pb.SendStreamResponse] = []
    async with client_for(harness) as client:
        with pytest.raises(RuntimeError, match="source broke"):
            await drain(client.send_stream({"canvas_id": CANVAS}, failing(), chunk_size=25), seen)

    assert seen[-1].HasField("summary")
    assert seen[-1].summary.recipients_sent == 60
    assert positions([r.result for r in seen if r.HasField("result")]) == list(range(60))


async def test_an_invalid_stream_header_raises_with_violations(harness: Harness) -> None:
    async with client_for(harness) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(client.send_stream({"canvas_id": ""}, recipients(3), timeout=TIMEOUT), [])

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request_violations(raised.value)] == ["canvas_id"]
    assert harness.fake.calls == []


# --- CLI ----------------------------------------------------------------------


class Cli:
    """Runs the CLI in the test's event loop against the harness gateway."""

    def __init__(self, harness: Harness, token: str = TOKEN) -> None:
        self.harness = harness
        self.token = token
        self.out = io.StringIO()
        self.err = io.StringIO()

    async def __call__(self, *argv: str, stdin: str = "") -> int:
        self.out, self.err = io.StringIO(), io.StringIO()
        return await run(
            ["--target", self.harness.target, "--timeout", str(TIMEOUT), *argv],
            environ={"CANVAS_GATEWAY_TOKEN": self.token},
            stdin=io.StringIO(stdin),
            stdout=self.out,
            stderr=self.err,
        )

    def lines(self) -> list[dict[str, Any]]:
        assert self.token not in self.out.getvalue() + self.err.getvalue()
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


@pytest.fixture
def cli(harness: Harness) -> Cli:
    return Cli(harness)


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


async def test_cli_send_prints_results_then_summary(cli: Cli) -> None:
    code = await cli("send", "--file", str(EXAMPLES / "recipients_email_prioritization.json"))

    assert code == 0, cli.err.getvalue()
    *results, summary = cli.lines()
    assert [r["result"]["outcome"] for r in results] == ["OUTCOME_SENT"]
    assert results[0]["result"]["positions"] == [0, 1]
    assert results[0]["result"]["code"] == "OK"  # every field is printed, defaults too, enums by name
    assert list(results[0]["result"]) == [  # in the proto's order, batch_index 0 too
        *("batch_index", "positions", "outcome", "code", "status_message", "retryable", "attempts"),
        *("violations", "braze", "details", "replayed"),
    ]
    assert isinstance(summary["summary"]["recipients"], int)
    assert summary["summary"]["recipients_sent"] == 2
    for line in cli.out.getvalue().splitlines():  # proto3 JSON: why outcomes keep OUTCOME_ here
        json_format.Parse(line, pb.SendStreamResponse())
    assert cli.err.getvalue().startswith("summary: 2 recipients in 1 batch: sent 2, canvas inactive 0")


async def test_cli_send_reads_stdin_and_validates_only(cli: Cli) -> None:
    body = (EXAMPLES / "recipients_external_ids.json").read_text()
    code = await cli("send", "--file", "-", "--validate-only", stdin=body)

    assert code == 0, cli.err.getvalue()
    *results, summary = cli.lines()
    assert [r["result"]["outcome"] for r in results] == ["OUTCOME_NOT_ATTEMPTED"]
    assert summary["summary"]["recipients_not_attempted"] == 2
    assert cli.harness.fake.calls == []


async def test_cli_send_stream_from_a_jsonl_file(cli: Cli, tmp_path: Path) -> None:
    header = write_jsonl(tmp_path / "header.json", [{"canvas_id": CANVAS, "context": {"a": 1}}])
    body = write_jsonl(tmp_path / "r.jsonl", list(recipients(120)))
    body.write_text(body.read_text() + "\n")  # a trailing blank line is skipped

    code = await cli("send-stream", "--header", str(header), "--recipients", str(body), "--chunk-size", "40")

    assert code == 0, cli.err.getvalue()
    *results, summary = cli.lines()
    assert len(results) == 3
    assert sorted(p for r in results for p in r["result"]["positions"]) == list(range(120))
    assert summary["summary"]["recipients_sent"] == 120


async def test_cli_send_stream_exits_1_when_a_recipient_is_rejected(cli: Cli, tmp_path: Path) -> None:
    header = write_jsonl(tmp_path / "header.json", [{"canvas_id": CANVAS}])
    items = [{"external_user_id": "user-0"}, {"email": "sam.patel@example.com"}]
    stdin = "".join(json.dumps(item) + "\n" for item in items)

    code = await cli("send-stream", "--header", str(header), "--recipients", "-", stdin=stdin)

    assert code == 1
    *results, summary = cli.lines()
    outcomes = sorted(r["result"]["outcome"] for r in results)
    assert outcomes == ["OUTCOME_REJECTED", "OUTCOME_SENT"]
    assert summary["summary"]["recipients_rejected"] == 1


async def test_cli_reports_the_line_of_a_bad_recipient(cli: Cli, tmp_path: Path) -> None:
    header = write_jsonl(tmp_path / "header.json", [{"canvas_id": CANVAS}])
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"external_user_id": "user-0"}\n{"external_user_id": "user-1"}\n{"nope": 1}\n')

    code = await cli("send-stream", "--header", str(header), "--recipients", str(bad))

    assert code == 2
    assert cli.err.getvalue().startswith(f"error: {bad}:3: ")
    assert 'no field named "nope"' in cli.err.getvalue()
    *_, summary = cli.lines()  # what was read before the bad line was sent and reported
    assert summary["summary"]["recipients_sent"] == 2


async def test_cli_reports_invalid_json_with_its_line(cli: Cli, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text('{\n  "canvas_id": "x",\n  oops\n}\n')

    assert await cli("send", "--file", str(body)) == 2
    assert cli.err.getvalue().startswith(f"error: {body}:3: invalid JSON")
    assert cli.out.getvalue() == ""


async def test_cli_reports_an_rpc_error_with_violations(cli: Cli, tmp_path: Path) -> None:
    body = write_jsonl(
        tmp_path / "body.json", [{"canvas_id": CANVAS, "recipients": [{"email": "jordan.lee@example.com"}]}]
    )

    assert await cli("send", "--file", str(body)) == 2
    lines = cli.err.getvalue().splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT: ")
    assert lines[1].startswith("  recipients[0].prioritization: ")
    assert cli.harness.fake.calls == []


async def test_cli_never_prints_a_rejected_token(harness: Harness) -> None:
    cli = Cli(harness, token="wrong-token-123")
    assert await cli("send", "--file", str(EXAMPLES / "recipients_alias.json")) == 3
    assert cli.err.getvalue().startswith("error: UNAUTHENTICATED: ")
    assert "wrong-token-123" not in cli.err.getvalue() + cli.out.getvalue()


async def test_cli_send_demo_prints_a_human_summary(cli: Cli) -> None:
    code = await cli("send-demo", "--recipients", "120", "--chunk-size", "50")

    assert code == 0, cli.err.getvalue()
    text = cli.out.getvalue()
    assert "120 recipients" in text
    assert "sent 120, canvas inactive 0, rejected 0, unknown 0" in text
    assert "recipients/s" in text
    dispatched = {call.dispatch_id for call in cli.harness.fake.calls}
    (shown,) = [line for line in text.splitlines() if line.startswith("  dispatch_ids: ")]
    assert set(shown.removeprefix("  dispatch_ids: ").split(", ")) == dispatched  # 3 of 3: no "(and"
    assert TOKEN not in text
    ids = [r["external_user_id"] for call in cli.harness.fake.calls for r in call.body["recipients"]]
    assert sorted(ids) == sorted(f"demo-user-{n}" for n in range(120))


async def test_cli_send_demo_takes_the_progress_options(cli: Cli) -> None:
    assert await cli("send-demo", "--recipients", "100", "--progress-every", "0") == 0, cli.err.getvalue()
    assert "progress: 100 of about 100 recipients (100%)" in cli.err.getvalue()

    code = await cli("send-demo", "--recipients", "100", "--progress-every", "0", "--no-progress")
    assert code == 0, cli.err.getvalue()
    assert "progress:" not in cli.err.getvalue()


async def test_cli_summary_shows_three_dispatch_ids_and_how_many_more(cli: Cli) -> None:
    code = await cli("send-demo", "--recipients", "260", "--chunk-size", "50")

    assert code == 0, cli.err.getvalue()
    dispatched = {call.dispatch_id for call in cli.harness.fake.calls}
    (shown,) = [line for line in cli.out.getvalue().splitlines() if line.startswith("  dispatch_ids: ")]
    ids, more = shown.removeprefix("  dispatch_ids: ").split(" (and ")
    assert len(set(ids.split(", ")) & dispatched) == 3 and more == "3 more)"  # 6 batches


def test_main_without_a_token_exits_3(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.delenv("CANVAS_GATEWAY_TOKEN", raising=False)
    assert main(["send", "--file", "body.json"]) == 3
    assert "no token" in capsys.readouterr().err


def test_main_reports_a_missing_file(tmp_path: Path, capsys: Any) -> None:
    missing = tmp_path / "missing.json"
    assert main(["--target", "127.0.0.1:1", "--token", TOKEN, "send", "--file", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {missing}: No such file or directory\n"
    assert TOKEN not in captured.out + captured.err


async def test_cli_reports_a_bad_first_recipient_rather_than_the_empty_stream(
    cli: Cli, tmp_path: Path
) -> None:
    header = write_jsonl(tmp_path / "header.json", [{"canvas_id": CANVAS}])

    code = await cli("send-stream", "--header", str(header), "--recipients", "-", stdin="[1, 2]\n")

    assert code == 2
    assert cli.err.getvalue() == "error: <stdin>:1: expected a JSON object (one Braze recipient)\n"
    assert cli.harness.fake.calls == []


@pytest.mark.parametrize(
    "fake_config", [FakeBrazeConfig(api_keys=frozenset(KEYS.values()), paused_canvases=frozenset({CANVAS}))]
)
async def test_cli_warns_and_exits_1_when_the_canvas_is_inactive(cli: Cli, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"canvas_id": CANVAS, "recipients": list(recipients(3))}))

    code = await cli("send", "--file", str(body))

    assert code == 1
    *results, summary = cli.lines()
    assert results[0]["result"]["braze"]["notice"] == PAUSED_NOTICE
    assert results[0]["result"]["outcome"] == "OUTCOME_CANVAS_INACTIVE"
    assert (
        summary["summary"]["recipients_canvas_inactive"] == 3 and summary["summary"]["recipients_sent"] == 0
    )
    assert "Canvas is inactive, so nothing was sent" in cli.err.getvalue()


@pytest.mark.parametrize(
    "fake_config", [FakeBrazeConfig(api_keys=frozenset(KEYS.values()) - {KEYS["acme"]})]
)  # acme's Braze key is wrong: Braze answers 401 to every batch
async def test_cli_summary_names_each_reason_with_its_recipients_and_batches(
    cli: Cli, tmp_path: Path
) -> None:
    people = list(recipients(200))
    for n in range(7):  # seven recipients the gateway refuses, each for its own field path
        people[10 + 20 * n] = {"email": f"person-{n}@example.com"}
    lines = write_jsonl(tmp_path / "r.jsonl", people)

    code = await cli("send-stream", "--header", header_file(tmp_path), "--recipients", str(lines))

    assert code == 1
    err = cli.err.getvalue()
    summary = err[err.index("summary: ") :].splitlines()
    why = summary[summary.index("  not sent, by reason:") + 1 :]
    assert why[0] == (
        "    193 recipients in 4 batches: REJECTED (INTERNAL): Braze refused the tenant's API key "
        "(wrong key or instance URL); nothing was sent"
    )
    assert why[1] == (  # one rule broken by seven recipients is one reason, wherever they are
        "    7 recipients in 7 batches: REJECTED (INVALID_ARGUMENT): prioritization: is required with email"
    )
    assert why[2] == "  dispatch_ids: none (Braze gave no batch one)"
    assert err.count("is required with email") == 7 + 1  # each recipient's line, then the reason


def test_the_summary_shows_the_reasons_with_most_recipients_then_how_many_more() -> None:
    reasons = Reasons(shown=2)
    for n in range(1, 5):
        reasons.add(pb.BatchResult(positions=range(n), outcome=pb.OUTCOME_UNKNOWN, status_message=f"w{n}"))
    reasons.add(pb.BatchResult(positions=[9], outcome=pb.OUTCOME_UNKNOWN, status_message="w4"))
    reasons.add(pb.BatchResult(positions=[8], outcome=pb.OUTCOME_REJECTED, code=99))

    assert reasons.lines() == [
        "  not sent, by reason:",
        "    5 recipients in 2 batches: UNKNOWN (OK): w4",
        "    3 recipients in 1 batch: UNKNOWN (OK): w3",
        "    and 3 more reasons: 4 recipients in 3 batches (each in the results file's `error`)",
    ]
    assert Reasons().lines() == []
    assert "REJECTED (99)" in reason(pb.BatchResult(outcome=pb.OUTCOME_REJECTED, code=99))


async def test_cli_reports_the_column_of_broken_json_in_a_recipients_line(cli: Cli, tmp_path: Path) -> None:
    header = write_jsonl(tmp_path / "header.json", [{"canvas_id": CANVAS}])
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"external_user_id": "a"}\n{"external_user_id":"b"\n')

    assert await cli("send-stream", "--header", str(header), "--recipients", str(bad)) == 2
    assert f"error: {bad}:2: invalid JSON" in cli.err.getvalue()
    assert "(column 24)" in cli.err.getvalue()


# --- CLI: bulk sends ------------------------------------------------------------


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    return path


def header_file(tmp_path: Path) -> str:
    return str(write_jsonl(tmp_path / "header.json", [{"canvas_id": CANVAS}]))


def sent_ids(harness: Harness) -> list[str]:
    return [r.get("external_user_id", "") for call in harness.fake.calls for r in call.body["recipients"]]


async def test_cli_streams_csv_keeping_strings_and_typed_columns(cli: Cli, tmp_path: Path) -> None:
    table = write_csv(
        tmp_path / "r.csv",
        [
            [
                "external_user_id",
                "email",
                "alias_name",
                "alias_label",
                "prioritization",
                "send_to_existing_only",
                "context.order_id",
                "context.total:json",
                "attributes.tier",
            ],
            ["user-1", "", "", "", "", "false", "007", "12.5", "gold"],
            ["", "ann@example.com", "", "", "identified|most_recently_updated", "", "A-1", "", ""],
            ["", "", "nick", "vip", "", "", "", '{"a": [1, true]}', ""],
        ],
    )
    results = tmp_path / "out.csv"

    code = await cli(
        "send-stream",
        "--header",
        header_file(tmp_path),
        "--recipients",
        str(table),
        "--results",
        str(results),
    )

    assert code == 0, cli.err.getvalue()
    [call] = cli.harness.fake.calls
    assert call.body["recipients"] == [
        {
            "external_user_id": "user-1",
            "send_to_existing_only": False,
            "context": {"order_id": "007", "total": 12.5},  # a string stays a string
            "attributes": {"tier": "gold"},
        },
        {
            "email": "ann@example.com",
            "prioritization": ["identified", "most_recently_updated"],
            "context": {"order_id": "A-1"},
        },
        {"user_alias": {"alias_name": "nick", "alias_label": "vip"}, "context": {"total": {"a": [1, True]}}},
    ]
    with results.open(newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows == [
        list(COLUMNS),
        ["0", "2", "external_user_id:user-1", "0", call.dispatch_id, "SENT", ""],
        ["1", "3", "email:ann@example.com", "0", call.dispatch_id, "SENT", ""],
        ["2", "4", "user_alias:vip/nick", "0", call.dispatch_id, "SENT", ""],
    ]


async def test_cli_refuses_a_csv_row_naming_two_identifiers_with_its_line(cli: Cli, tmp_path: Path) -> None:
    table = write_csv(
        tmp_path / "r.csv",
        [["external_user_id", "email"], ["u1", ""], ["u2", "u2@example.com"], ["u3", ""]],
    )
    results = tmp_path / "out.jsonl"

    code = await cli(
        "send-stream", "--header", header_file(tmp_path), "--recipients", str(table),
        "--max-bad-rows", "5", "--results", str(results),
    )  # fmt: skip

    assert code == 2  # invalid input, though the good rows were sent
    refusal = f"error: {table}:3: names external_user_id and email: a recipient names exactly one identifier"
    assert cli.err.getvalue().count(refusal) == 1
    assert "  bad rows: 1 (not sent)" in cli.err.getvalue()
    assert sent_ids(cli.harness) == ["u1", "u3"]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert all(list(row) == list(COLUMNS) for row in rows)  # every key, in a stable order
    bad = [row for row in rows if row["outcome"] == "INVALID_INPUT"]
    assert bad == [
        {
            "position": None,
            "line": 3,
            "recipient": None,
            "batch": None,
            "dispatch_id": None,
            "outcome": "INVALID_INPUT",
            "error": "names external_user_id and email: a recipient names exactly one identifier",
        }
    ]
    assert sorted((row["position"], row["line"]) for row in rows if row["position"] is not None) == [
        (0, 2),
        (1, 4),
    ]


async def test_cli_refuses_a_json_recipient_naming_two_identifiers(cli: Cli, tmp_path: Path) -> None:
    lines = tmp_path / "r.jsonl"
    lines.write_text(
        '{"external_user_id": "u0"}\n{"external_user_id": "u1", "email": "u1@example.com"}\n'
        '{"external_user_id": "u2"}\n'
    )

    code = await cli("send-stream", "--header", header_file(tmp_path), "--recipients", str(lines))

    assert code == 6  # a row was not read
    err = cli.err.getvalue()
    assert err.startswith(
        f"error: {lines}:2: names external_user_id and email: a recipient names exactly one identifier\n"
        f"error: {lines}: 1 row from line 3 on not read: the input ended at the bad row at line 2 "
        "(--max-bad-rows 0)\n"
    )
    assert err.count("names external_user_id and email") == 1
    assert sent_ids(cli.harness) == ["u0"]  # the input ends at the bad row; what came before is sent
    assert "  rows not read: 1 (not sent; NOT_READ in the results file)" in err


async def test_cli_results_rows_keep_json_types_and_map_rejections_to_lines(cli: Cli, tmp_path: Path) -> None:
    lines = tmp_path / "r.jsonl"
    lines.write_text(
        '{"external_user_id": "u0"}\n\n{"email": "sam.patel@example.com"}\n{"external_user_id": "u2"}\n'
    )
    results = tmp_path / "out.jsonl"

    code = await cli(
        "send-stream",
        "--header",
        header_file(tmp_path),
        "--recipients",
        str(lines),
        "--results",
        str(results),
    )

    assert code == 1  # a recipient was not sent
    rejected = f"rejected: {lines}:3: prioritization: "
    assert cli.err.getvalue().count(rejected) == 1  # each violation once, at its line
    text = results.read_text().splitlines()
    rows = sorted((json.loads(line) for line in text), key=lambda row: row["position"])
    assert [list(row) for row in rows] == [list(COLUMNS)] * 3
    assert [(row["position"], row["line"], row["outcome"]) for row in rows] == [
        (0, 1, "SENT"),
        (1, 3, "REJECTED"),
        (2, 4, "SENT"),
    ]
    assert all(isinstance(row["position"], int) and isinstance(row["batch"], int) for row in rows)
    assert rows[1]["recipient"] == "email:sam.patel@example.com"
    assert rows[1]["error"].startswith("recipients[1].prioritization: ") and rows[1]["dispatch_id"] is None
    assert rows[0]["error"] == "" and rows[0]["dispatch_id"] == cli.harness.fake.calls[0].dispatch_id


async def test_cli_dry_run_validates_and_sends_nothing(cli: Cli, tmp_path: Path) -> None:
    table = write_csv(tmp_path / "r.csv", [["external_user_id"], *([f"u{i}"] for i in range(60))])

    code = await cli(
        "send-stream", "--header", header_file(tmp_path), "--recipients", str(table), "--dry-run"
    )

    assert code == 0, cli.err.getvalue()
    *results, summary = cli.lines()
    assert {r["result"]["outcome"] for r in results} == {"OUTCOME_NOT_ATTEMPTED"}
    assert summary["summary"]["recipients_not_attempted"] == 60
    assert cli.harness.fake.calls == []


def test_main_prints_its_version(capsys: Any) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"canvas-gateway {metadata.version('canvas-gateway-client')}\n"


def test_an_unreachable_gateway_exits_4(capsys: Any) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"
        code = main(
            ["--target", target, "--token", TOKEN, "send", "--file", str(EXAMPLES / "recipients_alias.json")]
        )
    assert code == 4
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


async def test_a_wrong_target_with_a_key_says_what_it_waits_for(tmp_path: Path) -> None:
    """With a key a lost connection is waited for: the wait is said, and so is giving it up."""
    lines = write_jsonl(tmp_path / "r.jsonl", list(recipients(3)))
    err = io.StringIO()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"
        code = await run(
            [
                *("--target", target, "--timeout", "3"),
                *("send-stream", "--header", header_file(tmp_path), "--recipients", str(lines)),
                *("--idempotency-key", "k-1", "--no-progress"),
            ],
            environ={"CANVAS_GATEWAY_TOKEN": TOKEN},
            stdout=io.StringIO(),
            stderr=err,
        )

    assert code == 4
    waiting, gave_up, error, *_ = err.getvalue().splitlines()
    assert waiting.startswith(f"waiting to resume: the stream to {target} ended (UNAVAILABLE: ")
    assert re.search(
        rf"; resume 1 of 5 in 0.25 s, then up to [23] s for {target} to accept connections$", waiting
    )
    assert re.fullmatch(rf"gave up waiting: {target} did not accept connections within [23] s", gave_up)
    assert error.startswith("error: UNAVAILABLE: ")


def test_a_wait_to_resume_is_a_line_above_the_progress_bar() -> None:
    err = Terminal()
    report = Report(Console(io.StringIO(), err), validate_only=False, target="gw:50051")
    report.progress = Progress(err, 100, every=10.0)
    report.waiting(Waiting("draining", "UNAVAILABLE: the gateway is shutting down", 2, 5, 0.5, 60.0))
    report.waiting(Waiting("busy", "3 batches", 3, 5, 1.5, 60.0))
    report.close()

    lines = [line.strip("\r") for line in err.getvalue().splitlines()]
    assert (
        "waiting to resume: the gateway is draining (shutting down); resume 2 of 5 in 0.50 s, "
        "then up to 60 s for gw:50051 to accept connections"
    ) in lines
    assert (
        "waiting to resume: 3 batches are being sent by another call under this key; resume 3 of 5 in 1.50 s"
        in lines
    )

    plain = io.StringIO()  # not a terminal: a line between the progress lines
    report = Report(Console(io.StringIO(), plain), validate_only=False, target="gw:50051")
    report.progress = Progress(plain, 100, every=10.0)
    report.waiting(Waiting("lost", "UNAVAILABLE: Connection reset", 1, 5, 0.25, 60.0, gave_up=True))
    assert plain.getvalue() == "gave up waiting: gw:50051 did not accept connections within 60 s\n"


async def test_a_deadline_exceeded_exits_5(harness: Harness, tmp_path: Path) -> None:
    """Another failure of the RPC: the deadline passes while stdin has sent nothing yet."""
    read, write = os.pipe()
    stdin = os.fdopen(read)
    err = io.StringIO()
    argv = ["--target", harness.target, "--timeout", "0.5", "send-stream", "--header", header_file(tmp_path)]
    try:
        code = await run(
            [*argv, "--recipients", "-"],
            environ={"CANVAS_GATEWAY_TOKEN": TOKEN},
            stdin=stdin,
            stdout=io.StringIO(),
            stderr=err,
        )
    finally:
        os.close(write)  # the reader's thread sees the end of input, and then the pipe may close
        stdin.close()
    assert code == 5
    assert err.getvalue().startswith("error: DEADLINE_EXCEEDED: ")
    assert "not read: every row of <stdin>\n" in err.getvalue()  # the send stopped before any row


async def test_cli_prints_each_violation_once(cli: Cli, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"canvas_id": CANVAS, "recipients": [{"email": "a@example.com"}] * 2}))

    assert await cli("send", "--file", str(body)) == 2
    err = cli.err.getvalue()
    assert err.startswith("error: INVALID_ARGUMENT: 2 invalid fields:\n")
    for n in (0, 1):
        assert err.count(f"recipients[{n}].prioritization") == 1


async def test_cli_prints_plain_progress_lines_when_not_on_a_terminal(cli: Cli, tmp_path: Path) -> None:
    table = write_csv(tmp_path / "r.csv", [["external_user_id"], *([f"u{i}"] for i in range(120))])

    code = await cli(
        "send-stream", "--header", header_file(tmp_path), "--recipients", str(table),
        "--chunk-size", "40", "--progress-every", "0",
    )  # fmt: skip

    assert code == 0, cli.err.getvalue()
    progress = [line for line in cli.err.getvalue().splitlines() if line.startswith("progress: ")]
    assert len(progress) == 3  # a line for each result, as every 0 seconds asks
    assert progress[-1].startswith("progress: 120 of about 120 recipients (100%), ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_cli_draws_a_progress_bar_on_a_terminal(harness: Harness, tmp_path: Path) -> None:
    table = write_csv(tmp_path / "r.csv", [["external_user_id"], *([f"u{i}"] for i in range(120))])
    out, err = io.StringIO(), Terminal()
    argv = [
        "--target",
        harness.target,
        "send-stream",
        "--header",
        header_file(tmp_path),
        "--recipients",
        str(table),
    ]

    code = await run(argv, environ={"CANVAS_GATEWAY_TOKEN": TOKEN}, stdout=out, stderr=err)

    assert code == 0, err.getvalue()
    bar = err.getvalue()
    assert "120/120" in bar and "100%" in bar and " recipients/s" in bar
    assert "progress: " not in bar


async def test_ctrl_c_says_what_may_have_been_sent_and_keeps_the_results(
    harness: Harness, tmp_path: Path
) -> None:
    harness.fake.faults.set_latency(0.3)
    lines = write_jsonl(tmp_path / "r.jsonl", list(recipients(3000)))
    results = tmp_path / "out.jsonl"
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "canvas-gateway"),
        "--target", harness.target,
        "send-stream", "--header", header_file(tmp_path), "--recipients", str(lines),
        "--results", str(results), "--chunk-size", "100",
        env={**os.environ, "CANVAS_GATEWAY_TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            while len(harness.fake.calls) < 4:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the fake records a call as it answers: let the results reach the CLI
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 130, err.decode()
    text = err.decode()
    message = next(line for line in text.splitlines() if line.startswith("interrupted: "))
    assert "more were sent to the gateway without a result yet" in message
    assert "may have reached Braze" in message
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    had_result = int(message.removeprefix("interrupted: ").split(" ")[0].replace(",", ""))
    assert 0 < len(rows) == had_result < 3000  # what was known is in the file, and no more
    assert Counter(row["position"] for row in rows).most_common(1)[0][1] == 1
    dispatched = {call.dispatch_id for call in harness.fake.calls}
    assert {row["dispatch_id"] for row in rows if row["outcome"] == "SENT"} <= dispatched
    assert TOKEN not in text
