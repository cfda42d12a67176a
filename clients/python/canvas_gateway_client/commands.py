"""The commands of `canvas-gateway`: `send`, `send-stream`, `send-demo`, `results`, `unknown` and
`replay`, each run with a client and a `Report`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TextIO

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb

from .client import CanvasGatewayClient
from .console import Report, json_line
from .inputs import LineMap, close_recipients, count_rows, format_of, open_recipients, read_body, read_rows
from .recipients import RecipientSource
from .report import Progress
from .rows import InputError, Row
from .spreading import PART_SIZE, Part, _shift, _total, part_key
from .tracking import Tracked


def demo_recipients(count: int) -> Iterator[pb.Recipient]:
    """`count` synthetic recipients `demo-user-<n>`, each with a small context."""
    for n in range(count):
        recipient = pb.Recipient(external_user_id=f"demo-user-{n}")
        recipient.context.update({"demo_index": n, "greeting": f"Hello, demo user {n}"})
        yield recipient


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
        ordered=client.connections > 1,  # the results file in position order, whatever N
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


async def cmd_results(
    args: argparse.Namespace, client: CanvasGatewayClient, report: Report, stdin: TextIO
) -> None:
    """An earlier request's results, read back from the gateway (never sent again): the same
    lines, results file and exit status as the send had. The gateway keeps no identifier, so
    the results file's `recipient` column is empty; its `position` joins it to the input. Under a
    key, every part of the send is read (`_kept_parts`)."""
    summaries: list[pb.SendSummary] = []
    async for index, response in _kept_parts(client, args):
        if response.HasField("result"):
            result = response.result
            if index:  # a later part of a keyed send: its positions and batches in the send's terms
                shifted = _shift(
                    Tracked(pb.SendStreamResponse(result=result), ()), Part(index, index * PART_SIZE)
                )
                result = shifted.response.result
            report.result(result, [pb.Recipient()] * len(result.positions))
        else:
            summaries.append(response.summary)
    report.sent_out = report.resolved
    report.end(_total(summaries).response.summary)


async def _kept_parts(
    client: CanvasGatewayClient, args: argparse.Namespace
) -> AsyncIterator[tuple[int, pb.GetResultsResponse]]:
    """The kept results of a request, by part: under a key, part 0's (the key's own), then those of
    `part_key(key, 1)`, ... until the gateway has none for one (a send of one part has none)."""
    key: str = args.idempotency_key or ""
    index = 0
    while True:
        try:
            async for response in client.get_results(
                idempotency_key=part_key(key, index) if key else "",
                request_id=args.request_id or "",
                timeout=args.timeout,
            ):
                yield index, response
        except grpc.aio.AioRpcError as error:
            if index == 0 or error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return
        if not key:
            return
        index += 1


async def cmd_unknown(
    args: argparse.Namespace, client: CanvasGatewayClient, report: Report, stdin: TextIO
) -> None:
    """Your UNKNOWN batches not replayed yet: a JSON line each (request and result)."""
    report.json_lines = False
    count = 0
    async for batch in client.list_unknown(timeout=args.timeout):
        report.io.print(json_line(batch))
        count += 1
    report.io.error(f"{count:,} UNKNOWN {'batch' if count == 1 else 'batches'} not replayed")


async def cmd_replay(
    args: argparse.Namespace, client: CanvasGatewayClient, report: Report, stdin: TextIO
) -> None:
    """Send UNKNOWN batches again, once, with the acknowledgement; reported like a send."""
    response = await client.replay(
        acknowledge_duplicates=args.acknowledge_duplicates,
        idempotency_key=args.idempotency_key or "",
        request_id=args.request_id or "",
        batch_indexes=args.batch or (),
        timeout=args.timeout,
    )
    for result in response.results:
        report.result(result, [pb.Recipient()] * len(result.positions))
    report.sent_out = report.resolved
    report.end(response.summary)


Command = Callable[[argparse.Namespace, CanvasGatewayClient, Report, TextIO], Awaitable[None]]
COMMANDS: dict[str, Command] = {
    "send": cmd_send,
    "send-stream": cmd_send_stream,
    "send-demo": cmd_send_demo,
    "results": cmd_results,
    "unknown": cmd_unknown,
    "replay": cmd_replay,
}
"""Each command's run, by its name on the command line."""
