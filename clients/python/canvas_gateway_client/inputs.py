"""The CLI's input files: Braze JSON bodies, and recipients files (`-` is stdin) opened, read
lazily off the event loop as `Row`s (rows.py: JSON Lines or CSV), counted for the progress and
mapped back to their lines."""

from __future__ import annotations

import asyncio
import bisect
import io
import itertools
import json
from collections.abc import AsyncIterator
from typing import TextIO

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import json_format

from .rows import InputError, Row, _parse_error_reason, iter_rows

FORMATS = ("jsonl", "csv")


class LineMap:
    """Which input line each position came from, in memory that grows only where lines stop
    following positions (a blank line, a bad row, a CSV cell over several lines)."""

    def __init__(self, first_position: int) -> None:
        self._starts: list[int] = []
        self._offsets: list[int] = []
        self._next = first_position

    def add(self, line: int) -> None:
        """The next position came from `line`."""
        if not self._offsets or self._offsets[-1] != line - self._next:
            self._starts.append(self._next)
            self._offsets.append(line - self._next)
        self._next += 1

    def line(self, position: int) -> int | None:
        """The line of `position`; None for a position not read from the file."""
        at = bisect.bisect_right(self._starts, position) - 1
        return None if at < 0 or position >= self._next else position + self._offsets[at]


def parse_body(text: str, path: str) -> pb.CanvasTrigger:
    """A Braze `/canvas/trigger/send` JSON body as a CanvasTrigger, or InputError."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(body, dict):
        raise InputError(path, 1, "expected a JSON object (a Braze request body)")
    try:
        return json_format.ParseDict(body, pb.CanvasTrigger())
    except json_format.ParseError as exc:
        raise InputError(path, 0, _parse_error_reason(exc)) from None


def open_input(path: str, stdin: TextIO) -> tuple[TextIO, str]:
    if path == "-":
        return stdin, "<stdin>"
    try:
        return open(path, encoding="utf-8", newline=""), path  # the caller closes it
    except OSError as exc:
        raise InputError(path, 0, exc.strerror or str(exc)) from None


def open_recipients(path: str, stdin: TextIO) -> tuple[TextIO, str]:
    """A recipients file (`-` is stdin) as text whose bytes that are not UTF-8 are kept as
    surrogates (a bad row each, not the end of the file), with its own line ends. Close it with
    `close_recipients`."""
    if path == "-":
        binary = getattr(stdin, "buffer", None)
        if binary is None:  # already text (a test's StringIO)
            return stdin, "<stdin>"
        return io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline=""), "<stdin>"
    try:
        return open(path, encoding="utf-8", errors="surrogateescape", newline=""), path
    except OSError as exc:
        raise InputError(path, 0, exc.strerror or str(exc)) from None


def close_recipients(stream: TextIO, stdin: TextIO) -> None:
    """Close a file of `open_recipients`; stdin itself stays open."""
    if stream is stdin:
        return
    if isinstance(stream, io.TextIOWrapper) and stream.buffer is getattr(stdin, "buffer", None):
        stream.detach()
        return
    stream.close()


async def read_body(path: str, stdin: TextIO) -> pb.CanvasTrigger:
    """Read and parse a Braze JSON body file (`-` is stdin)."""

    def load() -> tuple[str, str]:
        stream, name = open_input(path, stdin)
        try:
            return stream.read(), name
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(name, 0, str(exc)) from None
        finally:
            if stream is not stdin:
                stream.close()

    text, name = await asyncio.to_thread(load)
    return parse_body(text, name)


async def read_rows(stream: TextIO, name: str, kind: str, block: int) -> AsyncIterator[Row]:
    """`iter_rows`, read `block` rows at a time off the event loop."""
    rows = iter_rows(stream, name, kind)
    while batch := await asyncio.to_thread(lambda: list(itertools.islice(rows, block))):
        for row in batch:
            yield row


def count_rows(path: str, kind: str) -> int | None:
    """About how many recipients a file holds (its non-blank lines, less a CSV header), for a
    progress bar's total; None for stdin or an unreadable file."""
    if path == "-":
        return None
    try:
        with open(path, "rb") as stream:
            lines = sum(1 for text in stream if text.strip())
    except OSError:
        return None
    return max(0, lines - 1) if kind == "csv" else lines


def format_of(path: str, chosen: str | None) -> str:
    """`csv` or `jsonl`: as chosen, else by the file's extension (JSON Lines by default)."""
    if chosen:
        return chosen
    return "csv" if path.lower().endswith(".csv") else "jsonl"
