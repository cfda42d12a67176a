"""What the CLI writes while a send runs: the results file and the progress.

The results file has one row per recipient, written as its result arrives, in JSON Lines or
CSV, with these keys (columns) in this order:

    position     its position in the send (header recipients first); null for a row not sent
    line         its line in the recipients file; null for recipients of a JSON body
    recipient    its identifier: external_user_id:<id>, email:<address> or
                 user_alias:<alias_label>/<alias_name>; null for a row not sent
    batch        the batch that held it (batch_index); null for a row not sent
    dispatch_id  Braze's receipt for that batch; null when Braze gave none
    outcome      SENT, CANVAS_INACTIVE, REJECTED, UNKNOWN, NOT_ATTEMPTED; INVALID_INPUT for a
                 row of the file that is not a recipient, NOT_READ for one the CLI did not read
                 (neither was sent)
    error        why it was not sent: the status message, or each violation; empty when SENT

Numbers are JSON numbers; in CSV an absent value is an empty cell.
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.rpc import code_pb2
from tqdm import tqdm

COLUMNS = ("position", "line", "recipient", "batch", "dispatch_id", "outcome", "error")
INVALID_INPUT = "INVALID_INPUT"
NOT_READ = "NOT_READ"


def identify(recipient: pb.Recipient) -> str:
    """A recipient's identifier, as the results file names it."""
    kind = recipient.WhichOneof("identifier")
    if kind is None:
        return ""
    if kind == "user_alias":
        return f"user_alias:{recipient.user_alias.alias_label}/{recipient.user_alias.alias_name}"
    return f"{kind}:{getattr(recipient, kind)}"


def outcome_name(outcome: int) -> str:
    """SENT, REJECTED, ...: the Outcome's name without its prefix."""
    return pb.Outcome.Name(outcome).removeprefix("OUTCOME_")  # type: ignore[arg-type]


def error_text(result: pb.BatchResult) -> str:
    """Why a result's recipients were not sent: each violation, else the status message."""
    if result.outcome == pb.OUTCOME_SENT:
        return ""
    if result.violations:
        return "; ".join(f"{v.field}: {v.description}" for v in result.violations)
    return result.status_message


def counted(count: int, one: str, many: str = "") -> str:
    """`1 batch`, `2 batches`: a count with its noun in the right number."""
    return f"{count:,} {one if count == 1 else many or one + 's'}"


_RECIPIENT = re.compile(r"^recipients\[\d+\]\.?")


def reason(result: pb.BatchResult) -> str:
    """A result's reason in one line: its outcome, its code and the gateway's status message, or
    its violations without the recipient's position (so one rule broken by many is one reason)."""
    code = code_pb2.Code.Name(result.code) if result.code in code_pb2.Code.values() else str(result.code)
    text = f"{outcome_name(result.outcome)} ({code})"
    if result.violations:
        message = "; ".join(
            f"{_RECIPIENT.sub('', v.field) or 'recipient'}: {v.description}" for v in result.violations
        )
    else:
        message = result.status_message
    message = " ".join(message.split())
    return f"{text}: {message}" if message else text


class Reasons:
    """Why recipients were not sent, for the summary: each distinct `reason` with how many
    recipients and batches it holds, the most recipients first, `shown` of them at most."""

    def __init__(self, shown: int = 5) -> None:
        self.shown = shown
        self.recipients: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()

    def add(self, result: pb.BatchResult) -> None:
        key = reason(result)
        self.recipients[key] += len(result.positions)
        self.batches[key] += 1

    def lines(self) -> list[str]:
        """`  not sent, by reason:` and a line per reason (then `and N more reasons: ...`)."""
        if not self.batches:
            return []
        ranked = sorted(self.batches, key=lambda key: (-self.recipients[key], -self.batches[key], key))
        lines = ["  not sent, by reason:"]
        for key in ranked[: self.shown]:
            lines.append(f"    {self._counts(self.recipients[key], self.batches[key])}: {key}")
        rest = ranked[self.shown :]
        if rest:
            recipients = sum(self.recipients[key] for key in rest)
            batches = sum(self.batches[key] for key in rest)
            lines.append(
                f"    and {counted(len(rest), 'more reason')}: {self._counts(recipients, batches)} "
                "(each in the results file's `error`)"
            )
        return lines

    @staticmethod
    def _counts(recipients: int, batches: int) -> str:
        return f"{counted(recipients, 'recipient')} in {counted(batches, 'batch', 'batches')}"


class ResultsFile:
    """The results file, JSON Lines or CSV (`kind`), a row per recipient."""

    def __init__(self, stream: TextIO, kind: str) -> None:
        self._stream = stream
        self._csv = csv.writer(stream, lineterminator="\n") if kind == "csv" else None
        if self._csv is not None:
            self._csv.writerow(COLUMNS)
        self.rows = 0

    def result(
        self, result: pb.BatchResult, recipients: Sequence[pb.Recipient], lines: Sequence[int | None]
    ) -> None:
        error = error_text(result)
        dispatch_id = result.braze.dispatch_id or None
        outcome = outcome_name(result.outcome)
        for position, recipient, line in zip(result.positions, recipients, lines, strict=True):
            self._write(
                (position, line, identify(recipient), result.batch_index, dispatch_id, outcome, error)
            )

    def bad_row(self, line: int, reason: str) -> None:
        self._write((None, line, None, None, None, INVALID_INPUT, reason))

    def not_read(self, line: int, reason: str) -> None:
        self._write((None, line, None, None, None, NOT_READ, reason))

    def _write(self, values: tuple[Any, ...]) -> None:
        if self._csv is not None:
            self._csv.writerow(["" if value is None else value for value in values])
        else:
            row = dict(zip(COLUMNS, values, strict=True))
            self._stream.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.rows += 1

    def close(self) -> None:
        self._stream.close()


class Progress:
    """Recipients with a result: a bar with rate and ETA on a terminal, otherwise a plain line
    every `every` seconds."""

    def __init__(self, stream: TextIO, total: int | None, every: float) -> None:
        self._stream = stream
        self._total = total
        self._every = every
        self._started = self._last = time.monotonic()
        self.done = 0
        self._bar: Any = None
        if stream.isatty():
            self._bar = tqdm(
                total=total, unit=" recipients", unit_scale=True, file=stream, dynamic_ncols=True
            )

    def advance(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif time.monotonic() - self._last >= self._every:
            self._line()

    def note(self, text: str) -> None:
        """A line of its own on the progress's stream (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def _line(self) -> None:
        self._last = now = time.monotonic()
        rate = self.done / max(now - self._started, 1e-9)
        line = f"progress: {self.done:,}"
        if self._total:
            line += f" of about {self._total:,} recipients ({min(self.done / self._total, 1):.0%})"
        else:
            line += " recipients"
        line += f", {rate:,.0f}/s"
        if self._total and rate > 0 and self.done < self._total:
            line += f", about {(self._total - self.done) / rate:,.0f} s left"
        print(line, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
