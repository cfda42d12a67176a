"""The rows of a recipients file, JSON Lines or CSV, each a recipient or why it is bad.

Recipients come as `Row`s: the line and either the Recipient or why the row is bad, so that a
bad row is reported with its line number. Every non-blank line of a recipients file is
accounted for by exactly one Row: as the first line of a recipient or of a bad row (a line
that is not UTF-8 is a bad row of its own), as a later line of a row (a CSV row with a quoted
cell over several lines), as one of a bad CSV row's `unread` lines (inside a quote that does
not close where a row could end: they cannot be told apart from the cell's text, so they are
never guessed into rows), or, after a read error, from the `end` Row's line on. Lines are
counted as the file's own: `\n`, `\r\n` or `\r` ends one, also inside a quoted CSV cell.

CSV: a header row names the columns; each row after it is one recipient:

    external_user_id, email, alias_name + alias_label   exactly one identifier a row
    prioritization                                      values separated by `|`
    send_to_existing_only                               `true` or `false`
    context.<key>, attributes.<key>,                    one key of that object each
    canvas_entry_properties.<key>

Cells are strings, and an empty cell is left out. A column named `<column>:json` (for example
`context.total:json`) holds JSON values, so numbers, booleans, lists and objects keep their type.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from typing import Any, NamedTuple, TextIO

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import json_format

IDENTIFIERS = ("external_user_id", "email", "user_alias")
_FIELD_COLUMNS = ("external_user_id", "email", "alias_name", "alias_label", "prioritization")
_OBJECT_COLUMNS = ("context", "canvas_entry_properties", "attributes")


class InputError(Exception):
    """A bad input file: its name, the 1-based line (0 when unknown) and the reason."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")
        self.line, self.reason = line, reason


class Row(NamedTuple):
    """One input row: its first line, and its recipient or why it is bad. A bad row may name
    lines after it that are `unread`; an `end` Row says the file cannot be read from its line on."""

    line: int
    recipient: pb.Recipient | None
    error: InputError | None = None
    unread: tuple[int, ...] = ()
    end: bool = False


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as surrogateescape keeps them


def _not_utf8(text: str, name: str, line: int) -> InputError | None:
    """Why a line read with errors="surrogateescape" is not UTF-8, or None."""
    found = _NOT_UTF8.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return InputError(name, line, f"not UTF-8: byte 0x{byte:02x} at column {found.start() + 1}")


def _parse_error_reason(exc: json_format.ParseError) -> str:
    # json_format appends a multi-line list of the available fields; the first line says it.
    return str(exc).splitlines()[0].rstrip(".")


def recipient_from_json(item: Any, path: str, line: int) -> pb.Recipient:
    """One Braze recipient object as a Recipient, or InputError (also for two identifiers)."""
    if not isinstance(item, dict):
        raise InputError(path, line, "expected a JSON object (one Braze recipient)")
    named = [name for name in IDENTIFIERS if item.get(name) is not None]
    if len(named) > 1:
        reason = f"names {' and '.join(named)}: a recipient names exactly one identifier"
        raise InputError(path, line, reason)
    try:
        return json_format.ParseDict(item, pb.Recipient())
    except json_format.ParseError as exc:
        raise InputError(path, line, _parse_error_reason(exc)) from None


def parse_recipient(text: str, path: str, line: int) -> pb.Recipient:
    """One JSON Lines line, a Braze recipient object, as a Recipient, or InputError."""
    try:
        item = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        raise InputError(path, line, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    return recipient_from_json(item, path, line)


def _jsonl_rows(stream: TextIO, name: str) -> Iterator[Row]:
    line = 0
    try:
        for line, text in enumerate(stream, start=1):
            if text.strip(" \t\r\n"):  # JSON's own whitespace
                yield _jsonl_row(text, name, line)
    except (OSError, UnicodeDecodeError) as exc:
        error = InputError(name, line + 1, f"cannot be read from this line on: {exc}")
        yield Row(line + 1, None, error, end=True)


def _jsonl_row(text: str, name: str, line: int) -> Row:
    try:
        bad = _not_utf8(text, name, line)
        if bad is not None:
            raise bad
        return Row(line, parse_recipient(text, name, line))
    except InputError as error:
        return Row(line, None, error)


class _Column(NamedTuple):
    field: str  # a recipient field, or the object a key belongs to
    key: str | None  # the key inside the object
    typed: bool  # cells hold JSON


def _column(title: str, name: str) -> _Column:
    spelled = title.strip()
    typed = spelled.endswith(":json")
    field, dot, key = spelled.removesuffix(":json").partition(".")
    if dot and key and field in _OBJECT_COLUMNS:
        return _Column(field, key, typed)
    if not dot and not typed and field in (*_FIELD_COLUMNS, "send_to_existing_only"):
        return _Column(field, None, False)
    raise InputError(name, 1, f"unknown column {title!r} (see the CSV layout: canvas-gateway --help)")


def _csv_item(columns: list[_Column], cells: list[str], name: str, line: int) -> dict[str, Any]:
    """A CSV row as a Braze recipient object."""
    item: dict[str, Any] = {}
    for column, cell in zip(columns, cells, strict=True):
        if cell == "":
            continue
        if column.key is not None:
            try:
                value = json.loads(cell) if column.typed else cell
            except json.JSONDecodeError as exc:
                raise InputError(
                    name, line, f"{column.field}.{column.key}: invalid JSON: {exc.msg}"
                ) from None
            item.setdefault(column.field, {})[column.key] = value
        elif column.field in ("alias_name", "alias_label"):
            item.setdefault("user_alias", {})[column.field] = cell
        elif column.field == "prioritization":
            item[column.field] = [part.strip() for part in cell.split("|") if part.strip()]
        elif column.field == "send_to_existing_only":
            if cell.lower() not in ("true", "false"):
                raise InputError(name, line, f"send_to_existing_only must be true or false, not {cell!r}")
            item[column.field] = cell.lower() == "true"
        else:
            item[column.field] = cell
    return item


class _Taken:
    """The lines a csv.reader takes, kept until `take` hands them over (one record's)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = iter(stream)
        self._taken: list[str] = []
        self.count = 0

    def __iter__(self) -> _Taken:
        return self

    def __next__(self) -> str:
        text = next(self._stream)
        self.count += 1
        self._taken.append(text)
        return text

    def take(self) -> list[str]:
        taken, self._taken = self._taken, []
        return taken

    def skip(self) -> str:
        """The next line, not kept (StopIteration at the end)."""
        self.count += 1
        return next(self._stream)


def _csv_rows(stream: TextIO, name: str) -> Iterator[Row]:
    lines = _Taken(stream)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(name, 1, f"the header row cannot be read: {exc}") from None
    if header is None:
        return
    bad = _not_utf8("".join(lines.take()), name, 1)
    if bad is not None:
        raise InputError(name, 1, f"the header row is {bad.reason}")
    columns = [_column(title, name) for title in header]
    if len({(c.field, c.key) for c in columns}) < len(columns):
        raise InputError(name, 1, "a column is named twice")
    while True:
        line = lines.count + 1
        try:
            cells = next(reader, None)
        except csv.Error as exc:
            yield from _broken(lines, name, line, str(exc))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            error = InputError(name, line, f"cannot be read from this line on: {exc}")
            yield Row(line, None, error, end=True)
            return
        if cells is None:
            return
        taken = lines.take()
        if not any(cells):
            continue
        try:
            for offset, text in enumerate(taken):
                bad = _not_utf8(text, name, line)
                if bad is not None:
                    where = f"line {line + offset}: " if offset else ""
                    raise InputError(name, line, where + bad.reason)
            if len(cells) != len(columns):
                raise InputError(name, line, f"{len(cells)} cells for {len(columns)} columns")
            yield Row(line, recipient_from_json(_csv_item(columns, cells, name, line), name, line))
        except InputError as error:
            yield Row(line, None, error)


def _broken(lines: _Taken, name: str, line: int, why: str) -> Iterator[Row]:
    """A CSV row the csv module could not read (a quote left open, text after a closing quote, a
    cell over the size limit): a bad row at its first line. Where its quotes leave a quoted cell
    open, the lines after it up to the one that closes it (or to the end of the file) cannot be
    told apart from the cell's text: they are the bad row's `unread` lines, never guessed into
    rows."""
    taken = lines.take()
    quotes = sum(text.count('"') for text in taken)
    if quotes % 2 == 0:  # its quotes close: one bad row, over the lines csv took for it
        if len(taken) > 1:
            why += f" (in this row, lines {line}-{line + len(taken) - 1})"
        yield Row(line, None, InputError(name, line, why))
        return
    unread = [line + offset for offset, text in enumerate(taken) if offset and text.rstrip("\r\n")]
    end = line + len(taken) - 1
    while quotes % 2:  # the lines are not kept: a quote left open may run to the end of a big file
        try:
            text = lines.skip()
        except (StopIteration, OSError, UnicodeDecodeError):
            lines.count -= 1
            break
        end += 1
        quotes += text.count('"')
        if text.rstrip("\r\n"):
            unread.append(end)
    if unread:
        why += (
            f": a quoted cell of this row does not close where a row could end, so lines "
            f"{line + 1}-{end} are not read"
        )
    yield Row(line, None, InputError(name, line, why), tuple(unread))


def iter_rows(stream: TextIO, name: str, kind: str) -> Iterator[Row]:
    """The rows of a recipients file of `kind` (jsonl or csv); blank lines are skipped. Every
    non-blank line is accounted for by one Row (see the module's docstring); only a bad CSV
    header raises InputError, before any row."""
    return _csv_rows(stream, name) if kind == "csv" else _jsonl_rows(stream, name)
