"""`canvas-gateway`: trigger Braze Canvases through canvas-gateway from the shell.

    canvas-gateway [--target HOST:PORT] [--token TOKEN] [--timeout SECONDS] [--tls | --ca-file PEM] COMMAND
      send --file BODY.json [--validate-only]
      send-stream --header HEADER.json --recipients RECIPIENTS.jsonl [--chunk-size N] [--validate-only]
      send-demo [--recipients N] [--canvas-id ID] [--chunk-size N]

`send` and `send-stream` print one JSON line per batch result, `{"result": {...}}`, then
`{"summary": {...}}` (proto3 JSON, Braze field names). The token comes from `--token`
or CANVAS_GATEWAY_TOKEN and is never printed.

Exit status: 0 when every result is OUTCOME_SENT without a `notice` (with --validate-only:
every result planned with code OK); 1 when some result is not (a `notice` means the Canvas
is inactive and nothing was sent; a warning says so); 2 for an RPC error or a bad input file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import json_format, message
from google.protobuf.descriptor import FieldDescriptor

from .client import DEFAULT_CHUNK_SIZE, CanvasGatewayClient, bad_request_violations
from .inputs import InputError, open_input, read_body, read_recipients

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "CANVAS_GATEWAY_TOKEN"  # noqa: S105 - the name of the variable, not a secret
DEMO_CANVAS_ID = "canvas-gateway-demo"
EXIT_OK, EXIT_NOT_SENT, EXIT_ERROR = 0, 1, 2


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
    return json.dumps(_int64_as_numbers(msg, data), separators=(",", ":"), ensure_ascii=False)


_INT64_TYPES = frozenset(
    {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
)


def _int64_as_numbers(msg: message.Message, data: dict[str, Any]) -> dict[str, Any]:
    """proto3 JSON writes 64-bit integers as strings (for JavaScript); the CLI's lines keep
    them numbers, as positions and counts are. Nested messages of ours are walked too."""
    for descriptor in msg.DESCRIPTOR.fields:
        key = descriptor.name
        if key not in data:
            continue
        if descriptor.type in _INT64_TYPES:
            data[key] = [int(v) for v in data[key]] if isinstance(data[key], list) else int(data[key])
        elif descriptor.message_type is not None and descriptor.message_type.full_name.startswith(
            "canvas_gateway."
        ):
            value = getattr(msg, key)
            if isinstance(value, message.Message):
                _int64_as_numbers(value, data[key])
    return data


@dataclass
class Tally:
    """What the results of one command add up to, for its exit status and the demo summary."""

    validate_only: bool
    results: int = 0
    notices: int = 0
    all_ok: bool = True
    dispatch_ids: list[str] = field(default_factory=list)
    summary: pb.SendSummary = field(default_factory=pb.SendSummary)

    def add(self, result: pb.BatchResult) -> None:
        self.results += 1
        if self.validate_only:
            ok = result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.code == 0
        else:
            ok = result.outcome == pb.OUTCOME_SENT
        self.notices += result.outcome == pb.OUTCOME_CANVAS_INACTIVE
        self.all_ok = self.all_ok and ok
        if result.braze.dispatch_id and len(self.dispatch_ids) < 3:
            self.dispatch_ids.append(result.braze.dispatch_id)

    def finish(self, io: Console) -> int:
        """Warn about no-op acceptances; the command's exit status."""
        if self.notices:
            io.error(
                f"warning: {self.notices:,} batches were accepted but their Canvas is inactive, "
                "so nothing was sent (see `notice`)"
            )
        return EXIT_OK if self.all_ok else EXIT_NOT_SENT


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


async def cmd_send(args: argparse.Namespace, client: CanvasGatewayClient, io: Console, stdin: TextIO) -> int:
    trigger = await read_body(args.file, stdin)
    response = await client.send(trigger, validate_only=args.validate_only, timeout=args.timeout)
    tally = Tally(args.validate_only)
    for result in response.results:
        tally.add(result)
        io.print(_json_line(pb.SendStreamResponse(result=result)))
    io.print(_json_line(pb.SendStreamResponse(summary=response.summary)))
    return tally.finish(io)


async def cmd_send_stream(
    args: argparse.Namespace, client: CanvasGatewayClient, io: Console, stdin: TextIO
) -> int:
    if args.header == "-" and args.recipients == "-":
        raise InputError("<stdin>", 0, "--header and --recipients cannot both be stdin")
    header = await read_body(args.header, stdin)
    stream, name = await asyncio.to_thread(open_input, args.recipients, stdin)
    tally = Tally(args.validate_only)
    try:
        recipients = read_recipients(stream, name, args.chunk_size)
        async for response in client.send_stream(
            header,
            recipients,
            chunk_size=args.chunk_size,
            validate_only=args.validate_only,
            timeout=args.timeout,
        ):
            if response.HasField("result"):
                tally.add(response.result)
            io.print(_json_line(response))
    finally:
        if stream is not stdin:
            stream.close()
    return tally.finish(io)


async def cmd_send_demo(
    args: argparse.Namespace, client: CanvasGatewayClient, io: Console, stdin: TextIO
) -> int:
    header = pb.CanvasTrigger(canvas_id=args.canvas_id)
    header.context.update({"campaign": "canvas-gateway send-demo"})
    tally = Tally(validate_only=False)
    started = time.perf_counter()
    async for response in client.send_stream(
        header, demo_recipients(args.recipients), chunk_size=args.chunk_size, timeout=args.timeout
    ):
        if response.HasField("result"):
            tally.add(response.result)
        else:
            tally.summary = response.summary
    elapsed = time.perf_counter() - started
    s = tally.summary
    io.print(
        f"send-demo: {s.recipients:,} recipients to canvas {args.canvas_id!r} in {tally.results:,} results"
    )
    io.print(
        f"  sent {s.recipients_sent:,}, canvas inactive {s.recipients_canvas_inactive:,}, "
        f"rejected {s.recipients_rejected:,}, unknown {s.recipients_unknown:,}, "
        f"not attempted {s.recipients_not_attempted:,}"
    )
    more = tally.results - len(tally.dispatch_ids)
    shown = ", ".join(tally.dispatch_ids) or "none"
    io.print(f"  dispatch_ids: {shown}" + (f" (and {more:,} more results)" if more > 0 else ""))
    rate = s.recipients / elapsed if elapsed > 0 else 0.0
    io.print(f"  {elapsed:.2f} s, {rate:,.0f} recipients/s")
    return tally.finish(io)


Command = Callable[[argparse.Namespace, CanvasGatewayClient, Console, TextIO], Awaitable[int]]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `canvas-gateway`."""
    parser = argparse.ArgumentParser(
        prog="canvas-gateway", description="Trigger Braze Canvases through canvas-gateway."
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"gateway address (default {DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--token", help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable, argv is visible to ps)"
    )
    parser.add_argument("--timeout", type=float, help="RPC deadline in seconds (default: none)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CA roots)")
    parser.add_argument("--ca-file", help="PEM CA certificates to trust; implies --tls")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = commands.add_parser("send", help="send one Braze JSON body with the unary Send")
    send.add_argument("--file", required=True, help="Braze /canvas/trigger/send JSON body (- for stdin)")
    send.add_argument("--validate-only", action="store_true", help="validate and plan, send nothing")
    send.set_defaults(run=cmd_send)

    stream = commands.add_parser("send-stream", help="stream recipients from a JSON Lines file")
    stream.add_argument("--header", required=True, help="Braze JSON body: canvas_id, context, audience...")
    stream.add_argument(
        "--recipients", required=True, help="JSON Lines, one Braze recipient per line (- for stdin)"
    )
    stream.add_argument("--chunk-size", type=_positive, default=DEFAULT_CHUNK_SIZE, help="recipients/message")
    stream.add_argument("--validate-only", action="store_true", help="validate and plan, send nothing")
    stream.set_defaults(run=cmd_send_stream)

    demo = commands.add_parser("send-demo", help="stream synthetic recipients demo-user-<n>")
    demo.add_argument("--recipients", type=_positive, default=1000, help="how many (default 1000)")
    demo.add_argument("--canvas-id", default=DEMO_CANVAS_ID, help=f"Canvas id (default {DEMO_CANVAS_ID})")
    demo.add_argument("--chunk-size", type=_positive, default=DEFAULT_CHUNK_SIZE, help="recipients/message")
    demo.set_defaults(run=cmd_send_demo)
    return parser


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if args.ca_file:
        with open(args.ca_file, "rb") as roots:
            return grpc.ssl_channel_credentials(root_certificates=roots.read())
    return grpc.ssl_channel_credentials() if args.tls else None


def _report_rpc_error(io: Console, error: grpc.aio.AioRpcError) -> None:
    io.error(f"error: {error.code().name}: {error.details() or ''}")
    for violation in bad_request_violations(error):
        io.error(f"  {violation.field}: {violation.description}")


async def run(
    argv: list[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the CLI in the current event loop; returns the exit status."""
    environ = os.environ if environ is None else environ
    stdin = sys.stdin if stdin is None else stdin
    io = Console(sys.stdout if stdout is None else stdout, sys.stderr if stderr is None else stderr)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    token: str = args.token or environ.get(TOKEN_ENV, "")
    io.token = token
    if not token:
        io.error(f"error: no token: set {TOKEN_ENV} or pass --token")
        return EXIT_ERROR
    try:
        client = CanvasGatewayClient(args.target, token, credentials=_credentials(args))
    except (ValueError, OSError) as error:  # a malformed token (never quoted) or an unreadable CA file
        io.error(f"error: {error}")
        return EXIT_ERROR
    command: Command = args.run
    try:
        async with client:
            return await command(args, client, io, stdin)
    except grpc.aio.AioRpcError as error:
        _report_rpc_error(io, error)
    except InputError as error:
        io.error(f"error: {error}")
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """The `canvas-gateway` console script."""
    try:
        return asyncio.run(run(argv))
    except KeyboardInterrupt:
        return 130
