"""What one command of `canvas-gateway` reports as it runs (`Report`) and where (`Console`): a
JSON line per result on stdout, the results file and the progress (report.py), the rejected
recipients' lines, and at the end a summary for people and the exit status."""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import json_format, message
from google.protobuf.descriptor import FieldDescriptor

from .exits import EXIT_INVALID, EXIT_NOT_READ, EXIT_NOT_SENT, EXIT_OK
from .inputs import LineMap
from .report import Progress, Reasons, ResultsFile, counted
from .rows import InputError
from .streaming import Waiting

BATCH_SIZE = 50  # Braze's recipients per call, so the gateway's most per batch
_POSITION = re.compile(r"recipients\[(\d+)\]\.?")


def json_line(msg: message.Message) -> str:
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
            self.io.print(json_line(pb.SendStreamResponse(result=result)))
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
            self.io.print(json_line(pb.SendStreamResponse(summary=summary)))

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
