"""The CLI's recipients files, fuzzed: every non-blank line of a CSV or JSON Lines file ends in
exactly one of sent (a result with its line), rejected (INVALID_INPUT with its line) or not read
(NOT_READ with its line), whatever the file holds: good and bad rows, quotes that never close,
bytes that are not UTF-8, blank lines, CRLF or CR line ends, cells over the csv module's limit.

The readers are fuzzed alone (many files, fast), then the CLI end to end against a real gateway
and the fake Braze (fewer files): what Braze received is exactly the rows the results file says
were sent, each once, and the exit status says whether rows were rejected or not read.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import pytest
from canvas_gateway_client.cli import run
from canvas_gateway_client.exits import EXIT_INVALID, EXIT_NOT_READ, EXIT_NOT_SENT, EXIT_OK
from canvas_gateway_client.inputs import close_recipients, open_recipients
from canvas_gateway_client.rows import Row, iter_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TOKENS, Harness

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same files every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LINE_END = re.compile(rb"\r\n|\r|\n")
CSV_HEADER = "external_user_id,email,context.note"


@dataclass(frozen=True)
class Unit:
    """A piece of a generated file: one row (or blank line), its bytes with their line ends."""

    kind: str  # good, bad (a row the reader must reject), blank, breaking (a CSV quote left open)
    data: bytes
    user: str = ""  # a good (or breaking) row's external_user_id


@dataclass(frozen=True)
class Reported:
    """What became of one line: sent (with its user), bad, or unread."""

    line: int
    kind: str
    user: str = ""


# --- generated files -----------------------------------------------------------------------

_TEXT = st.text(st.sampled_from('ab z"é€😀'), max_size=8)  # quotes, and more than ASCII
_FIRST_SEGMENT = st.text(st.sampled_from('ab, z"é'), max_size=8)  # commas only here, see below


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if re.search(r'[,"\r\n]', text) else text


@st.composite
def csv_units(draw: st.DrawFn, nl: bytes) -> Unit:
    n = draw(st.integers(0, 10**6))
    end = nl.decode()
    kinds = ["cells", "two_ids", "utf8", "stray", "huge", "blank", "open"]
    kind = draw(st.sampled_from(["good"] * 6 + kinds))
    if kind == "good":
        # A note over several lines: its later lines hold no comma, so that no reading of a
        # broken file can take one of them for a row with a recipient (a file is ambiguous
        # after a quote that never closes; these are not).
        note = draw(_FIRST_SEGMENT) + "".join(end + s for s in draw(st.lists(_TEXT, max_size=2)))
        return Unit("good", f"u{n},,{_csv_cell(note)}{end}".encode(), f"u{n}")
    if kind == "blank":
        return Unit("blank", nl)
    if kind == "open":
        return Unit("breaking", f'open{n},,"a quote that never closes{end}'.encode(), f"open{n}")
    data = {
        "cells": f"u{n},x,y,z{end}".encode(),
        "two_ids": f"u{n},u{n}@example.com,{end}".encode(),
        "utf8": f"u{n},,caf".encode() + b"\xff" + nl,
        "stray": f'u{n},,"a"b{end}'.encode(),  # text after a closing quote: the csv module refuses it
        "huge": f"u{n},,{'x' * 140_000}{end}".encode(),  # over csv.field_size_limit()
    }[kind]
    return Unit("bad", data)


@st.composite
def jsonl_units(draw: st.DrawFn, nl: bytes) -> Unit:
    n = draw(st.integers(0, 10**6))
    kinds = ["json", "array", "field", "two_ids", "utf8", "blank", "huge"]
    kind = draw(st.sampled_from(["good"] * 6 + kinds))
    if kind in ("good", "huge"):
        note = "x" * 200_000 if kind == "huge" else draw(st.text(max_size=12))
        item = {"external_user_id": f"u{n}", "context": {"note": note}}
        return Unit("good", json.dumps(item, ensure_ascii=draw(st.booleans())).encode() + nl, f"u{n}")
    if kind == "blank":
        return Unit("blank", draw(st.sampled_from([b"", b"  ", b"\t"])) + nl)
    data = {
        "json": b'{"external_user_id": "u' + str(n).encode() + b'"',
        "array": b"[1, 2]",
        "field": b'{"nope": 1}',
        "two_ids": f'{{"external_user_id": "u{n}", "email": "u{n}@example.com"}}'.encode(),
        "utf8": b'{"external_user_id": "u\xff"}',
    }[kind]
    return Unit("bad", data + nl)


def unique(units: list[Unit]) -> list[Unit]:
    """Good rows with users of their own (so that each is found by its user)."""
    seen: set[str] = set()
    kept = []
    for unit in units:
        if unit.kind == "good" and unit.user in seen:
            continue
        seen.add(unit.user)
        kept.append(unit)
    return kept


def files(kind: str) -> st.SearchStrategy[tuple[bytes, list[Unit]]]:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[bytes, list[Unit]]:
        nl = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        units = unique(draw(st.lists((csv_units if kind == "csv" else jsonl_units)(nl), max_size=30)))
        head = (CSV_HEADER.encode() + nl) if kind == "csv" else b""
        return head + b"".join(u.data for u in units), units

    return build()


# --- the property --------------------------------------------------------------------------


def check_accounting(
    kind: str, data: bytes, units: list[Unit], reported: list[Reported], stop: int | None = None
) -> None:
    """Each non-blank line ends in exactly one of sent, rejected or not read, with its own line.
    After `stop` (the bad row that ended the input) each row is reported not read at its line."""
    stop = stop or len(data) + 1
    lines = LINE_END.split(data)
    if lines and lines[-1] == b"":
        lines.pop()
    first_row = 2 if kind == "csv" else 1
    # Blank: an empty CSV line, or a JSON Lines line of JSON whitespace. A CSV line of empty
    # cells alone (`,,`, `""`) is blank too, so it may be skipped (it names no recipient).
    empty = re.compile(rb'[,"]*' if kind == "csv" else rb"[ \t]*")
    nonblank = {n for n, text in enumerate(lines, start=1) if not empty.fullmatch(text) and n >= first_row}
    rows = {n for n, text in enumerate(lines, start=1) if text and n >= first_row}  # may be reported
    spans: dict[int, tuple[int, Unit]] = {}  # a unit's first line: its last line, and it
    at = first_row
    for unit in units:
        count = len(LINE_END.findall(unit.data))
        spans[at] = (at + count - 1, unit)
        at += count

    by_line = {r.line: r for r in reported}
    assert len(by_line) == len(reported), "a line reported twice"
    assert set(by_line) <= rows, f"lines reported that hold no row: {set(by_line) - rows}"
    for row in reported:
        if row.kind == "sent":  # only a good row, whole, with its own recipient (or, see below)
            last, unit = spans[row.line]
            assert unit.user == row.user, (row, unit)
            if unit.kind == "good":
                assert not [n for n in by_line if row.line < n <= last], (
                    f"a line inside the row at {row.line}"
                )
            else:  # a quote left open that a later row's quote closes: CSV reads one row there
                assert unit.kind == "breaking", (row, unit)
    for n in sorted(nonblank - set(by_line)):  # a later line of the row that the last report began
        start = max((r for r in by_line if r < n), default=None)
        assert start is not None, f"line {n} is in no row"
        assert by_line[start].kind in ("sent", "bad") or start > stop, f"line {n} is in no row"
        if by_line[start].kind == "sent" and spans[start][1].kind == "good":
            assert n <= spans[start][0], f"line {n} is taken for part of the row at {start}"
    assert all(r.kind == "unread" for r in reported if r.line > stop)
    for first, (_, unit) in sorted(spans.items()):  # up to a quote left open, nothing is guessed
        if first > stop:
            break
        if unit.kind == "breaking":
            assert by_line[first].kind in ("bad", "sent")
            break
        if unit.kind == "good":
            assert by_line.get(first) == Reported(first, "sent", unit.user)
        elif unit.kind == "bad":
            assert by_line[first].kind == "bad", (first, unit.data[:60])


def reader_reports(rows: Iterator[Row]) -> list[Reported]:
    reported: list[Reported] = []
    for row in rows:
        if row.recipient is not None:
            reported.append(Reported(row.line, "sent", row.recipient.external_user_id))
        else:
            reported.append(Reported(row.line, "unread" if row.end else "bad"))
        reported.extend(Reported(line, "unread") for line in row.unread)
    return reported


class Stdin(io.StringIO):
    """A stdin whose bytes are in `buffer`, as sys.stdin's are."""

    def __init__(self, data: bytes | io.BytesIO) -> None:
        super().__init__()
        self._bytes = data if isinstance(data, io.BytesIO) else io.BytesIO(data)

    @property
    def buffer(self) -> io.BytesIO:
        return self._bytes


def read_file(kind: str, data: bytes) -> list[Reported]:
    stdin = Stdin(data)
    stream, name = open_recipients("-", stdin)
    try:
        reported = reader_reports(iter_rows(stream, name, kind))
    finally:
        close_recipients(stream, stdin)
    assert not stdin.buffer.closed  # stdin stays open for its owner
    return reported


@FUZZ
@given(file=files("csv"))
def test_the_csv_reader_accounts_for_every_line(file: tuple[bytes, list[Unit]]) -> None:
    data, units = file
    check_accounting("csv", data, units, read_file("csv", data))


@FUZZ
@given(file=files("jsonl"))
def test_the_jsonl_reader_accounts_for_every_line(file: tuple[bytes, list[Unit]]) -> None:
    data, units = file
    reported = read_file("jsonl", data)
    check_accounting("jsonl", data, units, reported)
    assert all(r.kind != "unread" for r in reported)  # a line is a row: nothing is left unread


def test_the_property_catches_a_reader_that_drops_rows() -> None:
    """The check itself fails on what the old reader did: rows before a broken quote gone."""
    data = f'{CSV_HEADER}\nu1,,a\nu2,,b\nu3,,"open\n'.encode()
    units = [Unit("good", b"u1,,a\n", "u1"), Unit("good", b"u2,,b\n", "u2"), Unit("breaking", b'u3,,"open\n')]
    check_accounting("csv", data, units, read_file("csv", data))
    with pytest.raises(AssertionError):
        check_accounting("csv", data, units, [Reported(2, "sent", "u1"), Reported(3, "bad")])


def test_a_read_error_reports_the_rest_of_the_file_not_read() -> None:
    class Failing:
        def __iter__(self) -> Iterator[str]:
            yield f"{CSV_HEADER}\n"
            yield "u1,,a\n"
            raise OSError(5, "Input/output error")

    for kind in ("csv", "jsonl"):
        rows = list(iter_rows(cast(TextIO, Failing()), "r", kind))
        assert (rows[-1].line, rows[-1].end) == (3, True)
        assert rows[-1].error is not None and "cannot be read from this line on" in rows[-1].error.reason


# --- the CLI, end to end -------------------------------------------------------------------


def cli_in(loop: asyncio.AbstractEventLoop, harness: Harness) -> Callable[..., tuple[int, str]]:
    """Runs the CLI on the harness's event loop from the fuzzing thread: (exit status, stderr)."""

    def call(*argv: str) -> tuple[int, str]:
        err = io.StringIO()
        done = asyncio.run_coroutine_threadsafe(
            run(
                ["--target", harness.target, "--timeout", "30", *argv],
                environ={"CANVAS_GATEWAY_TOKEN": TOKENS["acme"]},
                stdin=io.StringIO(),
                stdout=io.StringIO(),
                stderr=err,
            ),
            loop,
        )
        return done.result(60), err.getvalue()

    return call


def results_reports(path: Path) -> tuple[list[Reported], list[str]]:
    """What the results file says of each line, and the users it says were SENT."""
    reported, sent = [], []
    for text in path.read_text().splitlines():
        row: dict[str, Any] = json.loads(text)
        if row["outcome"] == "INVALID_INPUT":
            reported.append(Reported(row["line"], "bad"))
        elif row["outcome"] == "NOT_READ":
            reported.append(Reported(row["line"], "unread"))
        else:  # a result: SENT, or REJECTED by the gateway (a context over 50,000 bytes)
            assert row["position"] is not None and row["outcome"] in ("SENT", "REJECTED"), row
            user = row["recipient"].removeprefix("external_user_id:")
            reported.append(Reported(row["line"], "sent", user))
            if row["outcome"] == "SENT":
                sent.append(user)
    return reported, sent


def _fuzz_cli(call: Callable[..., tuple[int, str]], harness: Harness, tmp: Path) -> list[int]:
    codes: list[int] = []

    @settings(FUZZ, max_examples=60)
    @given(
        file=st.sampled_from(["csv", "jsonl"]).flatmap(lambda kind: st.tuples(st.just(kind), files(kind))),
        max_bad_rows=st.sampled_from([0, 1, 3, 1000]),
        chunk_size=st.sampled_from([1, 7, 500]),
    )
    def check(file: tuple[str, tuple[bytes, list[Unit]]], max_bad_rows: int, chunk_size: int) -> None:
        kind, (data, units) = file
        canvas = f"fuzz-{len(codes)}"
        (tmp / "header.json").write_text(json.dumps({"canvas_id": canvas}))
        recipients, results = tmp / f"r.{kind}", tmp / "results.jsonl"
        recipients.write_bytes(data)
        code, err = call(
            "send-stream", "--header", str(tmp / "header.json"), "--recipients", str(recipients),
            "--results", str(results), "--max-bad-rows", str(max_bad_rows),
            "--chunk-size", str(chunk_size), "--no-progress", "--resumes", "0",
        )  # fmt: skip
        codes.append(code)
        reported, sent = results_reports(results)
        bad = sorted(r.line for r in reported if r.kind == "bad")
        stop = bad[max_bad_rows] if len(bad) > max_bad_rows else None  # the input ended there
        check_accounting(kind, data, units, reported, stop)
        braze = [
            r["external_user_id"] for c in harness.fake.calls if c.body["canvas_id"] == canvas
            for r in c.body["recipients"]
        ]  # fmt: skip
        assert sorted(braze) == sorted(sent), err  # each once, and only what the file says was sent
        unread = any(r.kind == "unread" for r in reported)
        resulted = [r for r in reported if r.kind == "sent"]
        if unread:
            expected = EXIT_NOT_READ
        elif bad or not resulted:  # a bad row; or nothing to send, which the gateway refuses
            expected = EXIT_INVALID
        else:
            expected = EXIT_OK if len(sent) == len(resulted) else EXIT_NOT_SENT
        assert code == expected, err

    check()
    return codes


@pytest.mark.parametrize("settings_overrides", [{"breaker_failures": 0}])
async def test_the_cli_sends_rejects_or_reports_not_read_every_row(harness: Harness, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(400):
        codes = await asyncio.to_thread(_fuzz_cli, cli_in(loop, harness), harness, tmp_path)
    assert {EXIT_OK, EXIT_INVALID, EXIT_NOT_READ} <= set(codes), codes  # every ending was exercised


async def test_a_quote_left_open_at_line_3001_is_reported_there_and_nothing_is_lost(
    harness: Harness, tmp_path: Path
) -> None:
    """The issue's file: rows 2-3000 were read in the block that met the open quote and vanished,
    and the error named line 2502. Now they are sent, the quote is reported at its own line, and
    the lines it swallows are reported not read, each with its line."""
    header, recipients, results = tmp_path / "header.json", tmp_path / "r.csv", tmp_path / "out.csv"
    header.write_text(json.dumps({"canvas_id": "open-quote"}))
    lines = [CSV_HEADER, *(f"u{n},,row {n}" for n in range(2, 3001))]
    lines += ['u3001,,"a quote that never closes', *(f"u{n},,row {n}" for n in range(3002, 5001))]
    recipients.write_text("\n".join(lines) + "\n")
    out, err = io.StringIO(), io.StringIO()

    code = await run(
        [
            *("--target", harness.target, "send-stream", "--header", str(header)),
            *("--recipients", str(recipients), "--results", str(results), "--no-progress"),
        ],
        environ={"CANVAS_GATEWAY_TOKEN": TOKENS["acme"]},
        stdout=out,
        stderr=err,
    )

    assert code == EXIT_NOT_READ, err.getvalue()
    assert err.getvalue().startswith(
        f"error: {recipients}:3001: unexpected end of data: a quoted cell of this row does not close "
        "where a row could end, so lines 3002-5000 are not read\n"
    )
    assert "  rows not read: 1,999 (not sent; NOT_READ in the results file)" in err.getvalue()
    with results.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    by_outcome: dict[str, list[int]] = {}
    for row in rows:
        by_outcome.setdefault(row["outcome"], []).append(int(row["line"]))
    assert {outcome: sorted(found) for outcome, found in by_outcome.items()} == {
        "SENT": list(range(2, 3001)),
        "INVALID_INPUT": [3001],
        "NOT_READ": list(range(3002, 5001)),
    }
    sent = [r["external_user_id"] for call in harness.fake.calls for r in call.body["recipients"]]
    assert sorted(sent) == sorted(f"u{n}" for n in range(2, 3001))


class Breaking(io.BytesIO):
    """Bytes that fail with an I/O error once `good` of them are read (a pipe that breaks)."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data)
        self._good = good

    def read1(self, size: int | None = -1) -> bytes:
        if self.tell() >= self._good:
            raise OSError(5, "Input/output error")
        return super().read1(min(size if size and size > 0 else self._good, self._good - self.tell()))

    def read(self, size: int | None = -1) -> bytes:
        return self.read1(-1 if size is None else size)


async def run_cli(
    harness: Harness, tmp_path: Path, *argv: str, stdin: io.StringIO | None = None
) -> tuple[int, str]:
    header = tmp_path / "header.json"
    header.write_text(json.dumps({"canvas_id": "c"}))
    err = io.StringIO()
    code = await run(
        ["--target", harness.target, "send-stream", "--header", str(header), "--no-progress", *argv],
        environ={"CANVAS_GATEWAY_TOKEN": TOKENS["acme"]},
        stdin=stdin or io.StringIO(),
        stdout=io.StringIO(),
        stderr=err,
    )
    return code, err.getvalue()


async def test_a_read_error_on_stdin_reports_where_reading_stopped(harness: Harness, tmp_path: Path) -> None:
    good = b"".join(b'{"external_user_id": "u%d"}\n' % n for n in range(1, 4))
    stdin = Stdin(Breaking(good + b'{"external_user_id": "u4"}\n', len(good)))
    results = tmp_path / "out.jsonl"

    code, err = await run_cli(harness, tmp_path, "--recipients", "-", "--results", str(results), stdin=stdin)

    assert code == EXIT_NOT_READ, err
    assert "error: <stdin>:4: cannot be read from this line on: " in err
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((row["line"], row["outcome"]) for row in rows) == [
        (1, "SENT"), (2, "SENT"), (3, "SENT"), (4, "NOT_READ"),
    ]  # fmt: skip
    assert not stdin.buffer.closed  # stdin is its owner's to close


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'external_user_id,"context.a\nu1,x\n', "the header row cannot be read: unexpected end of data"),
        (b"external_user_id,context.\xe9\nu1,x\n", "the header row is not UTF-8: byte 0xe9 at column 26"),
    ],
)
async def test_a_csv_header_that_cannot_be_read_refuses_the_file(
    harness: Harness, tmp_path: Path, data: bytes, reason: str
) -> None:
    table = tmp_path / "r.csv"
    table.write_bytes(data)

    code, err = await run_cli(harness, tmp_path, "--recipients", str(table))

    assert code == EXIT_INVALID
    assert err.startswith(f"error: {table}:1: {reason}\n")
    assert harness.fake.calls == []


async def test_an_empty_or_missing_recipients_file_is_invalid_input(harness: Harness, tmp_path: Path) -> None:
    empty, missing = tmp_path / "empty.csv", tmp_path / "missing.csv"
    empty.write_bytes(b"")

    code, err = await run_cli(harness, tmp_path, "--recipients", str(empty))
    assert code == EXIT_INVALID
    assert err.startswith("error: INVALID_ARGUMENT: ")  # no recipient: nothing to send

    code, err = await run_cli(harness, tmp_path, "--recipients", str(missing))
    assert (code, err) == (EXIT_INVALID, f"error: {missing}: No such file or directory\n")
    assert harness.fake.calls == []
