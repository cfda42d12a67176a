"""Logging: one line a record, as text or JSON, each tagged with its request's id, secrets redacted.

Records that describe an event (an RPC, a batch that did not end SENT, a refused token) pass
their fields as `extra`: JSON output puts them at the top level of the object, text output
appends them as `key=value`. Numbers stay numbers in JSON; a field with a structure is a
`Counts` (an object in JSON, `sent:2 rejected:0` in text) or `Ranges` (`[[0, 49]]` in JSON,
`0..49` in text). The request id comes from a context variable that the RPC observer (`calls`)
sets, so every record made while serving a request, in any task it started, carries it without
being handed it. A worker of several (CGW_WORKERS) adds its index to every record as `worker`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, Final, TextIO

from pythonjsonlogger.json import JsonFormatter

from .redaction import redact

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
"""The id of the request being served; `-` outside any request."""

_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS: Final = ("levelname", "name", "request_id", "message")


class Counts(dict[str, int]):
    """Counts by name: a JSON object, and `name:count name:count` in text."""

    def __str__(self) -> str:
        return " ".join(f"{name}:{count}" for name, count in self.items())


class Ranges(list[tuple[int, int]]):
    """Sorted positions as their runs of consecutive values, `[first, last]` each: a JSON list of
    pairs, and `0..49` (`0..9,11..49` with a gap, `none` when empty) in text."""

    @classmethod
    def of(cls, positions: Iterable[int]) -> Ranges:
        runs = cls()
        for position in sorted(positions):
            if runs and position == runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], position)
            else:
                runs.append((position, position))
        return runs

    def __str__(self) -> str:
        return ",".join(f"{first}..{last}" if last > first else str(first) for first, last in self) or "none"


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra` fields a record was logged with."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class SecretFilter(logging.Filter):
    """Redacts the secrets a callable returns (read per record) from the message, the
    traceback and every string field of a record."""

    def __init__(self, secrets: Callable[[], frozenset[str]]) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets()
        message = record.getMessage()
        cleaned = redact(message, secrets)
        if cleaned != message or record.exc_info:
            if record.exc_info:
                cleaned += "\n" + redact(logging.Formatter().formatException(record.exc_info), secrets)
                record.exc_info = None
                record.exc_text = None
            record.msg = cleaned
            record.args = None
        for key, value in event_fields(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value, secrets))
        return True


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class WorkerFilter(logging.Filter):
    """Stamps each record with the index of the worker that made it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self._index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._index
        return True


class TextFormatter(logging.Formatter):
    """The classic line, then the event's fields as `key=value` (values with spaces quoted)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = event_fields(record)
        if not fields:
            return line
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        head, newline, trace = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {pairs}{newline}{trace}"


def _text_value(value: object) -> str:
    text = str(value)
    return repr(text) if (not text or any(ch.isspace() or ch in "\"'=" for ch in text)) else text


def formatter(log_format: str) -> logging.Formatter:
    """`text` or `json` (python-json-logger: one object a line, fields at the top level)."""
    if log_format == "json":
        return JsonFormatter(
            JSON_FIELDS,
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601, UTC
        )
    return TextFormatter()


def configure(
    level: str,
    log_format: str,
    secrets: Callable[[], frozenset[str]] | None = None,
    stream: TextIO | None = None,
    worker: int | None = None,
) -> None:
    """Route the root logger to `stream` (stderr) in `log_format`, redacting `secrets()` when given
    and marking every record with `worker` (a worker's index) when given."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RequestIdFilter())
    if worker is not None:
        handler.addFilter(WorkerFilter(worker))
    if secrets is not None:
        handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Throttled:
    """At most one line per `interval` seconds through `logger`, for lines a caller can cause at
    will (garbage requests): the next line that passes counts the ones dropped meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next = 0.0
        self._dropped = 0

    def warning(self, message: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._dropped += 1
            return
        self._next = now + self._interval
        dropped, self._dropped = self._dropped, 0
        suffix = f" ({dropped} more like it not logged)" if dropped else ""
        self._logger.warning(message + suffix, extra={**fields, "dropped": dropped})


OUT_OF_FILES: Final = "socket.accept() out of system resource"
"""asyncio's message when a listener cannot accept a connection for want of a file (EMFILE)."""


def throttle_accept_errors(loop: asyncio.AbstractEventLoop, where: str = "a listener") -> None:
    """Log `loop`'s listeners running out of open files as one throttled line (`where` names
    them), not asyncio's ERROR with a traceback per try: CPython retries every slot of the backlog
    each time (no break after EMFILE), and at an open-file limit of 1,024 that made 15,000-43,000
    records in seconds. Other loop errors keep asyncio's own handling."""
    throttled = Throttled(logging.getLogger("canvas_gateway_server.connections"))

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != OUT_OF_FILES:
            loop.default_exception_handler(context)
            return
        error = context.get("exception")
        reason = getattr(error, "strerror", None) or (type(error).__name__ if error is not None else "-")
        throttled.warning(
            f"{where}: cannot accept connections ({reason}): this process is out of open files (raise "
            "its limit, ulimit -n, or lower CGW_MAX_CONNECTIONS)",
            error=type(error).__name__ if error is not None else "-",
        )

    loop.set_exception_handler(handle)
