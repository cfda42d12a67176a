"""`canvas-gateway`: trigger Braze Canvases through canvas-gateway from the shell.

    canvas-gateway [--target HOST:PORT] [--token TOKEN] [--timeout S] [--tls | --ca-file PEM] COMMAND
      send --file BODY.json [--results FILE] [--dry-run] [--idempotency-key KEY]
      send-stream --header HEADER.json --recipients FILE|- [--format jsonl|csv] [--results FILE]
                  [--idempotency-key KEY] ...
      send-demo [--recipients N] [--canvas-id ID] [--chunk-size N] [--idempotency-key KEY]

`send` and `send-stream` print one JSON line per batch result, `{"result": {...}}`, then
`{"summary": {...}}` (proto3 JSON, Braze field names, keys in the proto's field order, 64-bit
integers as numbers, outcomes by the proto's names: OUTCOME_SENT), and a summary for people on
stderr (outcomes without the prefix, as in the results file: SENT). The token comes from
CANVAS_GATEWAY_TOKEN (or `--token`) and is never printed. The exit status says how it went
(EXIT_STATUS below). With `--idempotency-key KEY` the same command run again with the same key
after a failure sends nothing twice: what was sent comes back with `"replayed": true`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TextIO

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import json_format, message
from google.protobuf.descriptor import FieldDescriptor

from .client import (
    DEFAULT_CHUNK_SIZE,
    CanvasGatewayClient,
    KeyForgotten,
    RecipientSource,
    Waiting,
    bad_request_violations,
)
from .inputs import (
    FORMATS,
    InputError,
    LineMap,
    Row,
    close_recipients,
    count_rows,
    format_of,
    open_recipients,
    read_body,
    read_rows,
)
from .report import Progress, Reasons, ResultsFile, counted

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "CANVAS_GATEWAY_TOKEN"  # noqa: S105 - the name of the variable, not a secret
DEMO_CANVAS_ID = "canvas-gateway-demo"
BATCH_SIZE = 50  # Braze's recipients per call, so the gateway's most per batch

EXIT_OK, EXIT_NOT_SENT, EXIT_INVALID, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_FAILED = 0, 1, 2, 3, 4, 5
EXIT_NOT_READ = 6
EXIT_INTERRUPTED = 130
EXIT_STATUS = """\
exit status:
  0    every recipient sent (with --dry-run: every batch planned)
  1    some recipient not sent: rejected, unknown, not attempted, or its Canvas inactive
  2    invalid input: a bad flag, file or row, or the gateway refused the request
       (INVALID_ARGUMENT)
  3    authentication: no token, or the gateway refused it (UNAUTHENTICATED,
       PERMISSION_DENIED)
  4    gateway unavailable (UNAVAILABLE: unreachable, or draining with no resume left)
  5    any other RPC failure (DEADLINE_EXCEEDED, INTERNAL, ...), or a resume under
       --idempotency-key that found the gateway had forgotten the key (stopped at once)
  6    some rows of the recipients file were not read (after more bad rows than
       --max-bad-rows, inside a CSV quote that does not close, or past a read error):
       each is in the results file as NOT_READ with its line; the rows read were sent
  130  interrupted (Ctrl-C): what had a result is in the results file
"""
IDEMPOTENCY = """\
idempotency keys (--idempotency-key KEY, 1 to 128 of A-Z a-z 0-9 . _ : -, your tenant's own):
  the gateway keeps each batch's final result under the key (24 h by default). After a
  failure (exit 4 or 5, Ctrl-C, a crash), run the same command again with the same KEY and
  the same input: nothing is sent twice. Batches that had a result come back with
  "replayed": true (UNKNOWN stays UNKNOWN: it may have been sent); only the others are sent.
  A new request needs a new key: another body under a used key is REJECTED
  (FAILED_PRECONDITION) and not sent.
"""
CSV_LAYOUT = """\
CSV recipients (--format csv, or a .csv file): a header row, then one recipient a row.
  external_user_id | email | alias_name + alias_label   exactly one identifier a row
  prioritization                                      values separated by |
  send_to_existing_only                               true or false
  context.<key>, attributes.<key>,                    one key of that object each
  canvas_entry_properties.<key>
Cells are strings; an empty cell is left out. A column <name>:json (context.total:json)
holds JSON values, so numbers, booleans, lists and objects keep their type.
Every row ends sent, a bad row (INVALID_INPUT) or not read (NOT_READ), with its line in the
--results file; blank lines and rows of empty cells are skipped. A quote that does not close
where a row could end makes its row bad and the lines it swallowed NOT_READ.
"""
_RPC_EXITS = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
}
_POSITION = re.compile(r"recipients\[(\d+)\]\.?")


def demo_recipients(count: int) -> Iterator[pb.Recipient]:
    """`count` synthetic recipients `demo-user-<n>`, each with a small context."""
    for n in range(count):
        recipient = pb.Recipient(external_user_id=f"demo-user-{n}")
        recipient.context.update({"demo_index": n, "greeting": f"Hello, demo user {n}"})
        yield recipient


def _json_line(msg: message.Message) -> str:
    data = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(_stable(msg, data), separators=(",", ":"), ensure_ascii=False)


_INT64_TYPES = frozenset(
    {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
)


def _stable(msg: message.Message, data: dict[str, Any]) -> dict[str, Any]:
    """Keys in the proto's field order, whatever their values (json_format puts default values
    last), and 64-bit integers as numbers, as positions and counts are (proto3 JSON writes them
    as strings, for JavaScript). Nested messages of ours are walked too."""
    ordered: dict[str, Any] = {}
    for descriptor in msg.DESCRIPTOR.fields:
        key = descriptor.name
        if key not in data:
            continue
        value = data[key]
        if descriptor.type in _INT64_TYPES:
            value = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif descriptor.message_type is not None and descriptor.message_type.full_name.startswith(
            "canvas_gateway."
        ):
            nested = getattr(msg, key)
            if isinstance(nested, message.Message):
                value = _stable(nested, value)
        ordered[key] = value
    return ordered


@dataclass
class Console:
    """The CLI's output streams; every error text passes `redact` first."""

    out: TextIO
    err: TextIO
    token: str = ""

    def print(self, text: str) -> None:
        print(text, file=self.out)

    def error(self, text: str) -> None:
        print(self.redact(text), file=self.err)

    def redact(self, text: str) -> str:
        return text.replace(self.token, "[token]") if self.token else text


@dataclass
class Report:
    """Everything one command reports: its results (JSON lines, results file, progress, the
    lines of rejected recipients), bad rows, and at the end a summary and the exit status."""

    io: Console
    validate_only: bool
    keyed: bool = False  # sent under an idempotency key
    target: str = ""  # the gateway's address, for what a wait waits for
    json_lines: bool = True  # one JSON line per message on stdout (not for send-demo)
    results_file: ResultsFile | None = None
    progress: Progress | None = None
    source: str = ""  # the recipients file, for line numbers
    lines: LineMap = field(default_factory=lambda: LineMap(0))
    sent_out: int = 0  # recipients handed to the gateway; those without a result may be in flight
    resolved: int = 0  # recipients with a result
    read_to: int = 0  # the last line read from the recipients file (a resume reads it again)
    read_all: bool = False  # the recipients file was read to its end (or to where it stopped)
    batches: int = 0
    replayed: int = 0  # batches whose result the gateway kept under the key from an earlier call
    replayed_by_outcome: Counter[int] = field(default_factory=Counter)  # their recipients
    bad_rows: int = 0
    not_read: int = 0  # rows of the recipients file not read: NOT_READ in the results file
    notices: int = 0
    all_ok: bool = True
    dispatch_ids: list[str] = field(default_factory=list)  # the first few
    dispatched: int = 0  # batches with a dispatch_id
    by_outcome: Counter[int] = field(default_factory=Counter)
    reasons: Reasons = field(default_factory=Reasons)  # why recipients were not sent
    summary: pb.SendSummary | None = None
    started: float = field(default_factory=time.monotonic)

    def result(self, result: pb.BatchResult, recipients: Sequence[pb.Recipient]) -> None:
        self.batches += 1
        self.replayed += result.replayed
        if result.replayed:
            self.replayed_by_outcome[result.outcome] += len(result.positions)
        self.resolved += len(result.positions)
        self.by_outcome[result.outcome] += len(result.positions)
        if self.validate_only:
            ok = result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.code == 0
        else:
            ok = result.outcome == pb.OUTCOME_SENT
        self.all_ok = self.all_ok and ok
        if not ok:
            self.reasons.add(result)
        self.notices += result.outcome == pb.OUTCOME_CANVAS_INACTIVE
        if result.braze.dispatch_id:
            self.dispatched += 1
            if len(self.dispatch_ids) < 3:
                self.dispatch_ids.append(result.braze.dispatch_id)
        for violation in result.violations:  # a recipient the gateway refused: where it is
            self.io.error(f"rejected: {self._where(violation.field)}: {violation.description}")
        if self.json_lines:
            self.io.print(_json_line(pb.SendStreamResponse(result=result)))
        if self.results_file is not None:
            lines = [self.lines.line(p) for p in result.positions]
            self.results_file.result(result, recipients, lines)
        if self.progress is not None:
            self.progress.advance(len(result.positions))

    def waiting(self, waiting: Waiting) -> None:
        """A stream ended and the send waits to resume: say why, for what and for how long (the
        progress would stand still without a word)."""
        if waiting.gave_up:
            text = f"gave up waiting: {self.target} did not accept connections within {waiting.wait:,.0f} s"
        else:
            why = {
                "draining": "the gateway is draining (shutting down)",
                "busy": f"{waiting.detail} are being sent by another call under this key",
            }.get(waiting.cause, f"the stream to {self.target} ended ({waiting.detail})")
            text = (
                f"waiting to resume: {why}; resume {waiting.resume} of {waiting.limit} in "
                f"{waiting.pause:,.2f} s"
            )
            if waiting.cause != "busy":
                text += f", then up to {waiting.wait:,.0f} s for {self.target} to accept connections"
        if self.progress is not None:
            self.progress.note(self.io.redact(text))
        else:
            self.io.error(text)

    def _where(self, path: str) -> str:
        """`recipients[7].email` as `file:line: email` when recipient 7 came from a file line."""
        found = _POSITION.match(path)
        line = self.lines.line(int(found.group(1))) if found else None
        return path if found is None or line is None else f"{self.source}:{line}: {path[found.end() :]}"

    def bad_row(self, error: InputError) -> None:
        """A row that could not be read as a recipient: printed, and INVALID_INPUT in the results."""
        self.bad_rows += 1
        if self.results_file is not None:
            self.results_file.bad_row(error.line, error.reason)
        self.io.error(f"error: {error}")

    def unread(self, line: int, reason: str) -> None:
        """A row (or line) of the recipients file that was not read: NOT_READ in the results."""
        self.not_read += 1
        if self.results_file is not None:
            self.results_file.not_read(line, reason)

    def end(self, summary: pb.SendSummary) -> None:
        self.summary = summary
        if self.json_lines:
            self.io.print(_json_line(pb.SendStreamResponse(summary=summary)))

    def interrupted(self) -> None:
        """Ctrl-C: what may have been sent without a result."""
        waiting = self.sent_out - self.resolved
        have = "has" if self.resolved == 1 else "have"
        text = f"interrupted: {counted(self.resolved, 'recipient')} {have} a result"
        if waiting > 0:
            batches = counted(math.ceil(waiting / BATCH_SIZE), "batch", "batches")
            text += (
                f"; {waiting:,} more {'was' if waiting == 1 else 'were'} sent to the gateway without a "
                f"result yet (about {batches}): they may have reached Braze"
            )
            text += "" if self.keyed else ", check before sending them again"
        if self.keyed:
            text += "; run the same command again with the same --idempotency-key: nothing is sent twice"
        self.io.error(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.results_file is not None:
            self.results_file.close()

    def finish(self, failed: int | None, out: TextIO) -> int:
        """Print the summary for people on `out`; the exit status (`failed` when set)."""
        if self.summary is not None or self.batches:
            self._print_summary(out)
        if self.notices:
            self.io.error(
                f"warning: {counted(self.notices, 'batch', 'batches')} "
                f"{'was' if self.notices == 1 else 'were'} accepted but their Canvas is inactive, "
                "so nothing was sent (see `notice`)"
            )
        if failed not in (None, EXIT_INVALID) and self.source and not self.read_all:
            self.io.error(  # the send failed before the whole file was read
                f"not read: the rows of {self.source} after line {self.read_to:,}"
                if self.read_to
                else f"not read: every row of {self.source}"
            )
        if failed is not None and not (failed == EXIT_INVALID and self.not_read):
            return failed  # but rows not read say so, also when the gateway refused what was read
        if self.not_read:
            return EXIT_NOT_READ
        if self.bad_rows:
            return EXIT_INVALID
        return EXIT_OK if self.all_ok else EXIT_NOT_SENT

    def _print_summary(self, out: TextIO) -> None:
        s = self.summary or pb.SendSummary(  # cut short: what the results so far add up to
            recipients=self.resolved,
            batches=self.batches,
            recipients_sent=self.by_outcome[pb.OUTCOME_SENT],
            recipients_rejected=self.by_outcome[pb.OUTCOME_REJECTED],
            recipients_unknown=self.by_outcome[pb.OUTCOME_UNKNOWN],
            recipients_not_attempted=self.by_outcome[pb.OUTCOME_NOT_ATTEMPTED],
            recipients_canvas_inactive=self.by_outcome[pb.OUTCOME_CANVAS_INACTIVE],
        )
        lines = [
            f"summary: {counted(s.recipients, 'recipient')} in {counted(s.batches, 'batch', 'batches')}: "
            f"sent {s.recipients_sent:,}, "
            f"canvas inactive {s.recipients_canvas_inactive:,}, rejected {s.recipients_rejected:,}, "
            f"unknown {s.recipients_unknown:,}, not attempted {s.recipients_not_attempted:,}"
        ]
        lines.extend(self.io.redact(line) for line in self.reasons.lines())
        if self.bad_rows:
            lines.append(f"  bad rows: {self.bad_rows:,} (not sent)")
        if self.not_read:
            lines.append(f"  rows not read: {self.not_read:,} (not sent; NOT_READ in the results file)")
        if self.replayed:
            lines.append(self._replayed_line())
        if self.dispatch_ids:
            more = self.dispatched - len(self.dispatch_ids)
            shown = ", ".join(self.dispatch_ids) + (f" (and {more:,} more)" if more > 0 else "")
        else:
            shown = (
                "none (a dry run does not call Braze)"
                if self.validate_only
                else "none (Braze gave no batch one)"
            )
        lines.append(f"  dispatch_ids: {shown}")
        elapsed = time.monotonic() - self.started
        rate = self.resolved / elapsed if elapsed > 0 else 0.0
        lines.append(f"  {elapsed:.2f} s, {rate:,.0f} recipients/s; request_id {s.request_id or '-'}")
        if self.results_file is not None:
            lines.append(f"  results: {counted(self.results_file.rows, 'row')}")
        print("\n".join(lines), file=out)

    def _replayed_line(self) -> str:
        """What the idempotency key replayed, apart from what this run sent."""
        earlier = self.replayed_by_outcome
        recipients = sum(earlier.values())
        outcomes = ", ".join(
            f"{_WORDS[outcome]} {earlier[outcome]:,}" for outcome in _WORDS if earlier[outcome]
        )
        now = self.by_outcome[pb.OUTCOME_SENT] - earlier[pb.OUTCOME_SENT]
        return (
            f"  replayed: {counted(recipients, 'recipient')} in {counted(self.replayed, 'batch', 'batches')} "
            f"had their result from an earlier run under this idempotency key ({outcomes}): Braze was "
            f"not called for them; sent now: {now:,}"
        )


_WORDS = {  # an outcome in the summary's words, in its order
    pb.OUTCOME_SENT: "sent",
    pb.OUTCOME_CANVAS_INACTIVE: "canvas inactive",
    pb.OUTCOME_REJECTED: "rejected",
    pb.OUTCOME_UNKNOWN: "unknown",
    pb.OUTCOME_NOT_ATTEMPTED: "not attempted",
}


async def cmd_send(
    args: argparse.Namespace, client: CanvasGatewayClient, report: Report, stdin: TextIO
) -> None:
    trigger = await read_body(args.file, stdin)
    report.sent_out = len(trigger.recipients)
    response = await client.send(
        trigger, validate_only=args.validate_only, timeout=args.timeout, idempotency_key=args.idempotency_key
    )
    for result in response.results:
        report.result(result, [trigger.recipients[p] for p in result.positions])
    report.end(response.summary)


class InputStopped(Exception):
    """The input ended early at a bad row (past --max-bad-rows) or a read error: the rows before
    it are sent; those after it are reported not read."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


async def _rows_to_recipients(
    rows: AsyncIterator[Row], report: Report, max_bad_rows: int
) -> AsyncIterator[pb.Recipient]:
    """The good rows' recipients, noting their lines; bad rows and lines not read are reported,
    and the bad row past `max_bad_rows` (or a read error) ends the input: InputStopped is raised,
    after the recipients before it are sent. When the file is read again (a resume with an
    idempotency key), rows an earlier reading met are neither noted nor reported again."""
    bad = 0
    async for row in rows:
        again = row.line <= report.read_to
        report.read_to = max(report.read_to, row.line, *row.unread)
        if row.recipient is not None:
            if not again:
                report.lines.add(row.line)
                report.sent_out += 1
            yield row.recipient
            continue
        if row.error is None:  # pragma: no cover - a Row has one or the other
            continue
        if row.end:
            report.read_all = True
            if not again:
                report.io.error(f"error: {row.error}")
                report.unread(row.line, row.error.reason)
            raise InputStopped(row.line, f"the file cannot be read from line {row.line} on")
        bad += 1
        if not again:
            report.bad_row(row.error)
            for line in row.unread:
                report.unread(line, f"not read: inside a quoted cell of the bad row at line {row.line}")
        if bad > max_bad_rows:
            report.read_all = True  # the rest is reported not read
            raise InputStopped(
                row.line, f"the input ended at the bad row at line {row.line} (--max-bad-rows {max_bad_rows})"
            )
    report.read_all = True


async def _report_the_rest(rows: AsyncIterator[Row], report: Report, stopped: InputStopped) -> None:
    """After the input stopped: each row left in the file, reported not read with its line."""
    first = count = 0
    async for row in rows:
        for line in (row.line, *row.unread):
            if line > report.read_to:
                report.unread(line, f"not read: {stopped.reason}")
                first, count = first or line, count + 1
        report.read_to = max(report.read_to, row.line, *row.unread)
    if count:
        report.io.error(
            f"error: {report.source}: {count:,} {'row' if count == 1 else 'rows'} from line {first:,} on "
            f"not read: {stopped.reason}"
        )


async def _stream(
    args: argparse.Namespace,
    client: CanvasGatewayClient,
    report: Report,
    header: pb.CanvasTrigger,
    recipients: RecipientSource,
) -> None:
    async for tracked in client.send_stream_tracked(
        header,
        recipients,
        chunk_size=args.chunk_size,
        validate_only=args.validate_only,
        timeout=args.timeout,
        resumes=args.resumes,
        idempotency_key=args.idempotency_key,
        on_wait=report.waiting,
    ):
        response = tracked.response
        if response.HasField("result"):
            report.result(response.result, tracked.recipients)
        else:
            report.end(response.summary)


async def cmd_send_stream(
    args: argparse.Namespace, client: CanvasGatewayClient, report: Report, stdin: TextIO
) -> None:
    if args.header == "-" and args.recipients == "-":
        raise InputError("<stdin>", 0, "--header and --recipients cannot both be stdin")
    header = await read_body(args.header, stdin)
    kind = format_of(args.recipients, args.format)
    stream, report.source = await asyncio.to_thread(open_recipients, args.recipients, stdin)
    report.lines = LineMap(len(header.recipients))
    report.sent_out = len(header.recipients)
    opened = [stream]
    unread = [stream]  # the file opened above serves the first reading
    reading: list[AsyncIterator[Row]] = []  # the last reading's rows: those left when it stopped

    async def from_file() -> AsyncIterator[pb.Recipient]:
        """The file's recipients, from the first; each call after the first opens it again."""
        if unread:
            source = unread.pop()
        else:
            source, _ = await asyncio.to_thread(open_recipients, args.recipients, stdin)
            opened.append(source)
        rows = read_rows(source, report.source, kind, args.chunk_size)
        reading[:] = [rows]
        async for recipient in _rows_to_recipients(rows, report, args.max_bad_rows):
            yield recipient

    try:
        if args.progress:
            total = await asyncio.to_thread(count_rows, args.recipients, kind)
            report.progress = Progress(
                report.io.err, total and total + len(header.recipients), args.progress_every
            )
        recipients: RecipientSource = from_file  # a resume under a key reads it again from the first
        if not args.idempotency_key or stream is stdin:
            recipients = from_file()  # read once
        if args.idempotency_key and stream is stdin and args.resumes:
            report.io.error(
                "warning: recipients from stdin are read once: a stream the gateway ends is not "
                "resumed; run the command again with the same --idempotency-key and input instead"
            )
        try:
            await _stream(args, client, report, header, recipients)
        except InputStopped as stopped:
            await _report_the_rest(reading[0], report, stopped)
    finally:
        for each in opened:
            close_recipients(each, stdin)


async def cmd_send_demo(
    args: argparse.Namespace, client: CanvasGatewayClient, report: Report, stdin: TextIO
) -> None:
    header = pb.CanvasTrigger(canvas_id=args.canvas_id)
    header.context.update({"campaign": "canvas-gateway send-demo"})
    report.json_lines = False
    report.io.print(f"send-demo: {args.recipients:,} recipients to canvas {args.canvas_id!r}")
    if args.progress:
        report.progress = Progress(report.io.err, args.recipients, args.progress_every)

    def counted() -> Iterator[pb.Recipient]:
        for n, recipient in enumerate(demo_recipients(args.recipients), start=1):
            report.sent_out = max(report.sent_out, n)  # a resume under a key reads them again
            yield recipient

    await _stream(args, client, report, header, counted)


Command = Callable[[argparse.Namespace, CanvasGatewayClient, Report, TextIO], Awaitable[None]]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _version() -> str:
    try:
        return metadata.version("canvas-gateway-client")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def _stream_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-size", type=_positive, default=DEFAULT_CHUNK_SIZE, help="recipients a message"
    )
    parser.add_argument(
        "--resumes",
        type=_not_negative,
        default=5,
        help="streams a draining gateway may end before the send gives up (default 5); on each, "
        "the recipients without a result go on in a new stream, none sent twice. With "
        "--idempotency-key (and not from stdin), after a drain or a lost connection the whole "
        "input is sent again from the start under the key instead (batches with a result come "
        "back replayed and are not printed twice), and a batch another call is sending is "
        "tried again after the delay the gateway gives",
    )
    _key_option(
        parser,
        "makes running the command again safe: after a failure, run it again with the same KEY "
        "and input, and nothing is sent twice (results the gateway kept come back with "
        '"replayed": true); also lets a stream the gateway ends resume from the start '
        "(--resumes)",
    )


def _key_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--idempotency-key", metavar="KEY", help=text + "; see below")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `canvas-gateway`."""
    parser = argparse.ArgumentParser(
        prog="canvas-gateway",
        description="Trigger Braze Canvases through canvas-gateway.",
        epilog=EXIT_STATUS + "\n" + IDEMPOTENCY + "\n" + CSV_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"gateway address (default {DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--token", help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable, argv is visible to ps)"
    )
    parser.add_argument("--timeout", type=float, help="deadline of the whole send in seconds (default: none)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CA roots)")
    parser.add_argument("--ca-file", help="PEM CA certificates to trust; implies --tls")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def results_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--results", help="write one row per recipient to FILE (JSON Lines, or CSV for .csv)"
        )
        command.add_argument("--results-format", choices=FORMATS, help="the results file's format")
        command.add_argument(
            "--dry-run",
            "--validate-only",
            dest="validate_only",
            action="store_true",
            help="validate and plan the batches, send nothing",
        )

    send = commands.add_parser(
        "send",
        help="send one Braze JSON body with the unary Send",
        epilog=EXIT_STATUS + "\n" + IDEMPOTENCY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("--file", required=True, help="Braze /canvas/trigger/send JSON body (- for stdin)")
    results_options(send)
    _key_option(
        send,
        "makes running the command again safe: after a failure, run it again with the same KEY "
        'and body, and nothing is sent twice (results the gateway kept come back with "replayed": true)',
    )
    send.set_defaults(run=cmd_send)

    stream = commands.add_parser(
        "send-stream",
        help="stream recipients from a JSON Lines or CSV file",
        epilog=EXIT_STATUS + "\n" + IDEMPOTENCY + "\n" + CSV_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stream.add_argument("--header", required=True, help="Braze JSON body: canvas_id, context, audience...")
    stream.add_argument(
        "--recipients", required=True, help="JSON Lines or CSV, a recipient a row (- for stdin)"
    )
    stream.add_argument(
        "--format", choices=FORMATS, help="the recipients' format (default: by extension, else jsonl)"
    )
    stream.add_argument(
        "--max-bad-rows",
        type=_not_negative,
        default=0,
        help="bad rows to report and skip; the one after ends the input there, and the rows after it "
        "are reported not read (exit status 6) (default 0)",
    )
    _progress_options(stream)
    results_options(stream)
    _stream_options(stream)
    stream.set_defaults(run=cmd_send_stream)

    demo = commands.add_parser(
        "send-demo",
        help="stream synthetic recipients demo-user-<n>",
        epilog=IDEMPOTENCY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--recipients", type=_positive, default=1000, help="how many (default 1000)")
    demo.add_argument("--canvas-id", default=DEMO_CANVAS_ID, help=f"Canvas id (default {DEMO_CANVAS_ID})")
    _progress_options(demo)
    _stream_options(demo)
    demo.set_defaults(run=cmd_send_demo, validate_only=False)
    return parser


def _progress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")
    parser.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, a progress line this often (default 10)",
    )


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if args.ca_file:
        with open(args.ca_file, "rb") as roots:
            return grpc.ssl_channel_credentials(root_certificates=roots.read())
    return grpc.ssl_channel_credentials() if args.tls else None


def _report_rpc_error(io: Console, error: grpc.aio.AioRpcError) -> int:
    """Print a failed RPC (each violation once); its exit status."""
    violations = bad_request_violations(error)
    if violations:
        io.error(f"error: {error.code().name}: {counted(len(violations), 'invalid field')}:")
        for violation in violations:
            io.error(f"  {violation.field}: {violation.description}")
        listed = re.search(r"the details list the first \d+ of (\d+) violations", error.details() or "")
        if listed:
            io.error(f"  (and {int(listed.group(1)) - len(violations):,} more not listed)")
    else:
        io.error(f"error: {error.code().name}: {error.details() or ''}")
    return _RPC_EXITS.get(error.code(), EXIT_FAILED)


def _open_results(args: argparse.Namespace) -> ResultsFile | None:
    path: str | None = getattr(args, "results", None)
    if path is None:
        return None
    try:
        stream = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed by Report
    except OSError as exc:
        raise InputError(path, 0, exc.strerror or str(exc)) from None
    return ResultsFile(stream, format_of(path, args.results_format))


async def run(
    argv: list[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the CLI in the current event loop; returns the exit status (EXIT_STATUS)."""
    environ = os.environ if environ is None else environ
    stdin = sys.stdin if stdin is None else stdin
    io = Console(sys.stdout if stdout is None else stdout, sys.stderr if stderr is None else stderr)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_INVALID
    token: str = args.token or environ.get(TOKEN_ENV, "")
    io.token = token
    if not token:
        io.error(f"error: no token: set {TOKEN_ENV} or pass --token")
        return EXIT_AUTH
    try:
        client = CanvasGatewayClient(args.target, token, credentials=_credentials(args))
    except ValueError as error:  # a malformed token, never quoted
        io.error(f"error: {error}")
        return EXIT_AUTH
    except OSError as error:  # an unreadable CA file
        io.error(f"error: {error}")
        return EXIT_INVALID
    report = Report(io, args.validate_only, keyed=bool(args.idempotency_key), target=args.target)
    failed: int | None = None
    command: Command = args.run
    try:
        report.results_file = _open_results(args)
        async with client:
            await command(args, client, report, stdin)
    except grpc.aio.AioRpcError as error:
        failed = _report_rpc_error(io, error)
    except InputError as error:
        io.error(f"error: {error}")
        failed = EXIT_INVALID
    except KeyForgotten as error:
        io.error(f"error: {error}")
        failed = EXIT_FAILED
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels the main task
        report.interrupted()
        failed = EXIT_INTERRUPTED
    finally:
        report.close()
    return report.finish(failed, io.out if args.command == "send-demo" else io.err)


def main(argv: list[str] | None = None) -> int:
    """The `canvas-gateway` console script."""
    try:
        return asyncio.run(run(argv))
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the event loop
        return EXIT_INTERRUPTED
