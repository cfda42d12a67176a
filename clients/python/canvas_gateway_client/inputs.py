"""The CLI's input files: Braze JSON bodies and JSON Lines of recipients, read lazily."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import TextIO

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import json_format


class InputError(Exception):
    """A bad input file: its name, the 1-based line (0 when unknown) and the reason."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")


def _parse_error_reason(exc: json_format.ParseError) -> str:
    # json_format appends a multi-line list of the available fields; the first line says it.
    return str(exc).splitlines()[0].rstrip(".")


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


def parse_recipient(text: str, path: str, line: int) -> pb.Recipient:
    """One JSON Lines line, a Braze recipient object, as a Recipient, or InputError."""
    try:
        item = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        raise InputError(path, line, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(item, dict):
        raise InputError(path, line, "expected a JSON object (one Braze recipient)")
    try:
        return json_format.ParseDict(item, pb.Recipient())
    except json_format.ParseError as exc:
        raise InputError(path, line, _parse_error_reason(exc)) from None


def open_input(path: str, stdin: TextIO) -> tuple[TextIO, str]:
    if path == "-":
        return stdin, "<stdin>"
    try:
        return open(path, encoding="utf-8"), path  # the caller closes it
    except OSError as exc:
        raise InputError(path, 0, exc.strerror or str(exc)) from None


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


async def read_recipients(stream: TextIO, name: str, block: int) -> AsyncIterator[pb.Recipient]:
    """Recipients from JSON Lines, read `block` lines at a time off the event loop.

    Blank lines are skipped. Raises InputError at the first bad line, after yielding
    every recipient before it.
    """
    line = 0
    while True:
        try:
            lines = await asyncio.to_thread(lambda: list(itertools.islice(stream, block)))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(name, line + 1, str(exc)) from None
        if not lines:
            return
        for text in lines:
            line += 1
            if text.strip():
                yield parse_recipient(text, name, line)
