"""The generated clients of every language, run end to end: each language's example programs
(clients/README.md) against a real gateway and the fake Braze on 127.0.0.1, their printed
results checked against what the fake Braze received.

The Go, TypeScript and Java examples must be built first (`make clients`, which `make test`
runs). A missing build skips their tests, unless REQUIRE_CLIENT_BUILDS=1 (set by `make test`;
not a CGW_ variable, which the gateway would refuse as unknown),
when it fails them: CI can never pass with a client unbuilt.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from canvas_gateway_client import exits
from fake_braze.faults import Fault
from fake_braze.record import ReceivedCall
from support import TOKENS, Harness

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
BUILT = {
    "python": CLIENTS / "python" / "examples" / "send_stream.py",
    "go": CLIENTS / "go" / "bin" / "send-stream",
    "node": CLIENTS / "node" / "dist" / "examples" / "send-stream.js",
    "java": CLIENTS / "java" / "examples" / "target" / "canvas-gateway-examples.jar",
}
LANGUAGES = list(BUILT)
# The examples that take --idempotency-key (clients/README.md); Python's take it not yet (the
# Python client's keys are tested in test_client_keys.py).
TLS = Path(__file__).resolve().parent / "fixtures" / "tls"
RUN_SECONDS = 60
RESULT = re.compile(
    r"result batch=(\d+) outcome=(OUTCOME_\w+) code=(\w+) recipients=(\d+) first=(\d+) dispatch_id=(\S+)"
    r"( replayed=true)?"
)
SUMMARY = re.compile(r"summary recipients=(\d+) batches=(\d+) sent=(\d+) request_id=(\S+)")


def _exit_table() -> dict[str, dict[str, int | None]]:
    """clients/README.md's exit-status table: each row's first cell -> {column: status, or None}."""
    text = (CLIENTS / "README.md").read_text()
    lines = text[text.index("## Exit status: one table") :].split("\n\n| ", 1)[1].split("\n\n")[0]
    header, _, *rows = ("| " + lines).splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    table = {}
    for row in rows:
        first, *cells = (cell.strip() for cell in row.strip().strip("|").split("|"))
        table[first] = {c: None if v == "-" else int(v) for c, v in zip(columns, cells, strict=True)}
    return table


EXIT_TABLE = _exit_table()


def exit_status(row_start: str, column: str = "Examples") -> int | None:
    """The status clients/README.md's exit table gives in `column` for the row that starts so."""
    (row,) = [cells for first, cells in EXIT_TABLE.items() if first.startswith(row_start)]
    return row[column]


@dataclass
class Run:
    code: int
    results: list[tuple[int, str, str, int, int, str, bool]]
    summary: tuple[int, int, int, str] | None
    stderr: str


def _require_built(language: str) -> None:
    if not BUILT[language].exists():
        if os.environ.get("REQUIRE_CLIENT_BUILDS") == "1":
            pytest.fail(f"the {language} example is not built: run `make clients`")
        pytest.skip(f"the {language} example is not built (make clients)")


async def example(language: str, program: str, *args: str, token: str | None = TOKENS["acme"]) -> Run:
    """Run clients/<language>/example <program> <args> and parse what it prints."""
    _require_built(language)
    environ = {k: v for k, v in os.environ.items() if k != "CANVAS_GATEWAY_TOKEN"}
    if token is not None:
        environ["CANVAS_GATEWAY_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        str(CLIENTS / language / "example"),
        program,
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    results, summary = [], None
    for line in out.decode().splitlines():
        if found := RESULT.fullmatch(line):
            batch, outcome, code, count, first, dispatch_id, replayed = found.groups()
            results.append((int(batch), outcome, code, int(count), int(first), dispatch_id, bool(replayed)))
        elif found := SUMMARY.fullmatch(line):
            recipients, batches, sent, request_id = found.groups()
            summary = (int(recipients), int(batches), int(sent), request_id)
        else:
            pytest.fail(f"{language} {program} printed a line outside the spec: {line!r}")
    assert process.returncode is not None
    return Run(process.returncode, results, summary, err.decode())


def _sent_users(harness: Harness) -> list[str]:
    return sorted(r["external_user_id"] for call in harness.fake.calls for r in call.body["recipients"])


@pytest.mark.parametrize("language", LANGUAGES)
async def test_send_stream_prints_every_batch_with_braze_s_dispatch_id(
    harness: Harness, language: str
) -> None:
    run = await example(
        language, "send-stream", "--target", harness.target, "--recipients", "1234", "--chunk-size", "300"
    )
    assert run.code == 0, run.stderr
    calls = harness.fake.calls
    assert len(calls) == 25
    assert {r[5] for r in run.results} == {call.dispatch_id for call in calls}
    assert sorted(r[0] for r in run.results) == list(range(25))
    assert all(r[1:3] == ("OUTCOME_SENT", "OK") for r in run.results)
    assert sorted((r[4], r[3]) for r in run.results) == [(i, min(50, 1234 - i)) for i in range(0, 1234, 50)]
    assert run.summary is not None and run.summary[:3] == (1234, 25, 1234) and run.summary[3]
    assert _sent_users(harness) == sorted(f"user-{i}" for i in range(1234))
    first = next(call.body for call in calls if call.body["recipients"][0]["external_user_id"] == "user-0")
    assert first["canvas_id"] == "canvas-gateway-demo" and first["context"] == {"campaign": "example"}
    assert first["recipients"][0]["context"] == {"index": 0}


@pytest.mark.parametrize("program", ["send", "send-stream"])
@pytest.mark.parametrize("language", LANGUAGES)
async def test_run_again_with_its_idempotency_key_the_example_prints_replayed_results_and_sends_nothing(
    harness: Harness, language: str, program: str
) -> None:
    args: tuple[str, ...] = ("--target", harness.target, "--recipients", "120")
    if program == "send-stream":
        args += ("--chunk-size", "70")
    key = ("--idempotency-key", f"polyglot-{language}-{program}.1")

    first = await example(language, program, *args, *key)
    assert first.code == 0, first.stderr
    calls = len(harness.fake.calls)
    assert calls == 3
    dispatched = {_first_index(call): call.dispatch_id for call in harness.fake.calls}
    assert sorted(r[:6] for r in first.results) == [
        (i, "OUTCOME_SENT", "OK", n, 50 * i, dispatched[50 * i]) for i, n in enumerate([50, 50, 20])
    ]
    assert not any(r[6] for r in first.results)

    again = await example(language, program, *args, *key)
    assert again.code == 0, again.stderr
    assert len(harness.fake.calls) == calls  # Braze was not called again
    assert sorted(r[:6] for r in again.results) == sorted(r[:6] for r in first.results)
    assert all(r[6] for r in again.results)  # every line ends replayed=true
    assert again.summary is not None and again.summary[:3] == (120, 3, 120)

    unkeyed = await example(language, program, *args)  # without the key: sent again
    assert unkeyed.code == 0, unkeyed.stderr
    assert len(harness.fake.calls) == 2 * calls and not any(r[6] for r in unkeyed.results)


CONTEXT_KEYS = ("go", "java", "node", "python")
"""The examples that take --context-keys (clients/README.md): all four."""


@pytest.mark.parametrize("program", ["send", "send-stream"])
@pytest.mark.parametrize("language", CONTEXT_KEYS)
async def test_a_resend_with_a_many_key_context_in_another_map_order_is_replayed_each_time(
    harness: Harness, language: str, program: str
) -> None:
    """Go writes a map's entries in random order, Python's protobuf in an order seeded per process,
    and the TypeScript example inserts its keys in random order: each run is the same request
    with its maps in another order, and a repeat under the key must be replayed, never 'differs'."""
    args: tuple[str, ...] = ("--target", harness.target, "--recipients", "120", "--context-keys", "12")
    if program == "send-stream":
        args += ("--chunk-size", "70")
    key = ("--idempotency-key", f"polyglot-{language}-{program}.keys")

    first = await example(language, program, *args, *key)
    assert first.code == 0, first.stderr
    assert len(harness.fake.calls) == 3 and not any(r[6] for r in first.results)
    for _ in range(3):
        again = await example(language, program, *args, *key)
        assert again.code == 0, (again.stderr, again.results)
        assert len(harness.fake.calls) == 3  # Braze was not called again
        assert sorted(r[:6] for r in again.results) == sorted(r[:6] for r in first.results)
        assert all(r[6] for r in again.results)  # every line ends replayed=true
    body = harness.fake.calls[0].body  # canonical: keys sorted at every depth
    keys = sorted(["campaign", *(f"key-{j}" for j in range(12))])
    assert list(body["context"]) == keys and body["context"]["key-11"] == 11
    assert [list(r["context"]) for r in body["recipients"]] == [sorted(["index", *keys[1:]])] * 50


def _first_index(call: ReceivedCall) -> int:
    """The context index of a Braze call's first recipient (its batch's first position)."""
    index: int = call.body["recipients"][0]["context"]["index"]
    return index


def test_the_exit_table_holds_the_cli() -> None:
    """The CLI column of clients/README.md's exit table is what the Python CLI returns."""
    rpc = exits._RPC_EXITS
    statuses = {
        "every result": exits.EXIT_OK,
        "some result not": exits.EXIT_NOT_SENT,
        "a bad flag": exits.EXIT_INVALID,
        "no `CANVAS_GATEWAY_TOKEN`": exits.EXIT_AUTH,
        "the gateway refused the request": rpc[grpc.StatusCode.INVALID_ARGUMENT],
        "the gateway refused the token": rpc[grpc.StatusCode.UNAUTHENTICATED],
        "the gateway is unreachable": rpc[grpc.StatusCode.UNAVAILABLE],
        "any other RPC failure": rpc.get(grpc.StatusCode.DEADLINE_EXCEEDED, exits.EXIT_FAILED),
        "rows of the recipients file": exits.EXIT_NOT_READ,
        "interrupted": exits.EXIT_INTERRUPTED,
    }
    assert rpc[grpc.StatusCode.PERMISSION_DENIED] == rpc[grpc.StatusCode.UNAUTHENTICATED]
    assert len(EXIT_TABLE) == len(statuses)
    for row, status in statuses.items():
        assert exit_status(row, "CLI") == status, row
        assert f"\n  {status:<4} " in exits.EXIT_STATUS, status  # and its --help lists it


@pytest.mark.parametrize("language", LANGUAGES)
async def test_send_prints_results_in_batch_order(harness: Harness, language: str) -> None:
    run = await example(language, "send", "--target", harness.target)
    assert run.code == exit_status("every result"), run.stderr
    assert [(r[0], r[3], r[4]) for r in run.results] == [(0, 50, 0), (1, 50, 50), (2, 20, 100)]
    assert {r[5] for r in run.results} == {call.dispatch_id for call in harness.fake.calls}
    assert run.summary is not None and run.summary[:3] == (120, 3, 120)


@pytest.mark.parametrize("language", LANGUAGES)
async def test_an_invalid_recipient_prints_the_bad_request_details_and_sends_nothing(
    harness: Harness, language: str
) -> None:
    run = await example(language, "send", "--target", harness.target, "--bad-email")
    assert run.code == exit_status("the gateway refused the request")
    assert run.results == [] and run.summary is None
    lines = run.stderr.splitlines()
    assert any(line.startswith("error code=INVALID_ARGUMENT message=") for line in lines), run.stderr
    violations = sorted(line for line in lines if line.startswith("violation "))
    assert [v.split(" description=")[0] for v in violations] == [
        "violation field=recipients[120].email",
        "violation field=recipients[120].prioritization",
    ]
    assert harness.fake.calls == []


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_batch_not_sent_makes_the_exit_status_1(harness: Harness, language: str) -> None:
    harness.fake.faults.script([Fault.status(500)])  # the first call's outcome is unknown
    run = await example(language, "send-stream", "--target", harness.target, "--recipients", "200")
    assert run.code == exit_status("some result not"), run.stderr
    outcomes = sorted(r[1:3] for r in run.results)
    assert outcomes == [("OUTCOME_SENT", "OK")] * 3 + [("OUTCOME_UNKNOWN", "UNKNOWN")]
    unknown = next(r for r in run.results if r[1] == "OUTCOME_UNKNOWN")
    assert unknown[5] == "-"  # a 500 carries no dispatch_id
    assert run.summary is not None and run.summary[:3] == (200, 4, 150)


@pytest.mark.parametrize("language", LANGUAGES)
async def test_without_a_token_the_example_refuses_to_start(harness: Harness, language: str) -> None:
    run = await example(language, "send-stream", "--target", harness.target, token=None)
    assert run.code == exit_status("no `CANVAS_GATEWAY_TOKEN`") and run.results == []
    assert harness.fake.calls == []


@pytest.mark.parametrize("language", LANGUAGES)
async def test_an_unknown_token_fails_the_rpc(harness: Harness, language: str) -> None:
    run = await example(language, "send", "--target", harness.target, token="not-a-token")
    assert run.code == exit_status("the gateway refused the token")
    assert "error code=UNAUTHENTICATED" in run.stderr
    assert "not-a-token" not in run.stderr
    assert harness.fake.calls == []


@pytest.mark.parametrize(
    "settings_overrides",
    [{"tls_cert_file": str(TLS / "localhost.crt"), "tls_key_file": str(TLS / "localhost.key")}],
)
@pytest.mark.parametrize("language", LANGUAGES)
async def test_the_example_dials_tls_trusting_a_ca_file(harness: Harness, language: str) -> None:
    target = f"localhost:{harness.gateway.port}"
    run = await example(
        language,
        "send-stream",
        "--target",
        target,
        "--ca-file",
        str(TLS / "localhost.crt"),
        "--recipients",
        "60",
    )
    assert run.code == exit_status("every result"), run.stderr
    assert run.summary is not None and run.summary[:3] == (60, 2, 60)


@pytest.mark.parametrize("language", LANGUAGES)
async def test_an_unreachable_gateway_fails_the_rpc(language: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        run = await example(language, "send", "--target", f"127.0.0.1:{closed.getsockname()[1]}")
    assert run.code == exit_status("the gateway is unreachable"), run.stderr
    assert "error code=UNAVAILABLE" in run.stderr and run.results == []


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_bad_flag_is_a_usage_error(language: str) -> None:
    run = await example(language, "send", "--no-such-flag")
    assert run.code == exit_status("a bad flag") and run.results == []


JAVA_EXAMPLES = (
    CLIENTS / "java" / "examples" / "src" / "main" / "java" / "internal" / "canvasgateway" / "examples"
)


def test_the_java_readme_s_usage_is_the_quickstart_example_verbatim() -> None:
    """The README's snippet is a file the build compiles, so it cannot stop compiling unseen."""
    readme = (CLIENTS / "java" / "README.md").read_text()
    assert f"```java\n{(JAVA_EXAMPLES / 'Quickstart.java').read_text()}```\n" in readme


async def test_the_java_quickstart_sends_through_the_library_and_its_key_replays(harness: Harness) -> None:
    """The library's client end to end: Send under an idempotency key with a deadline (replayed the
    second time), then a SendStream without a key (sent again)."""
    _require_built("java")
    main = "internal.canvasgateway.examples.Quickstart"
    environ = {**os.environ, "CANVAS_GATEWAY_TOKEN": TOKENS["acme"]}
    outputs = []
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            "java",
            "-cp",
            str(BUILT["java"]),
            main,
            harness.target,
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), RUN_SECONDS)
        assert process.returncode == 0, err.decode()
        outputs.append(out.decode().splitlines())
    first, again = outputs
    assert re.fullmatch(r"send batch 0: OUTCOME_SENT dispatch_id=\w+ replayed=false", first[0]), first
    assert again[0] == first[0].replace("replayed=false", "replayed=true")
    for lines in outputs:
        assert sorted(lines[1:-1]) == [f"stream batch {i}: OUTCOME_SENT recipients=50" for i in range(2)] + [
            "stream batch 2: OUTCOME_SENT recipients=20"
        ]
        assert lines[-1] == "stream sent 120"
    assert len(harness.fake.calls) == 1 + 3 + 3  # the Send once, the stream twice
