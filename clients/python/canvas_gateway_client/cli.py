"""`canvas-gateway`: trigger Braze Canvases through canvas-gateway from the shell.

    canvas-gateway [--target HOST:PORT] [--token TOKEN] [--timeout S] [--tls | --ca-file PEM] COMMAND
      send --file BODY.json [--results FILE] [--dry-run] [--idempotency-key KEY]
      send-stream --header HEADER.json --recipients FILE|- [--format jsonl|csv] [--results FILE]
                  [--idempotency-key KEY] [--connections N] ...
      send-demo [--recipients N] [--canvas-id ID] [--chunk-size N] [--idempotency-key KEY]
      results (--idempotency-key KEY | --request-id ID) [--results FILE]

`send` and `send-stream` print one JSON line per batch result, `{"result": {...}}`, then
`{"summary": {...}}` (proto3 JSON, Braze field names, keys in the proto's field order, 64-bit
integers as numbers, outcomes by the proto's names: OUTCOME_SENT), and a summary for people on
stderr (outcomes without the prefix, as in the results file: SENT). The token comes from
CANVAS_GATEWAY_TOKEN (or `--token`) and is never printed. The exit status says how it went
(exits.EXIT_STATUS). With `--idempotency-key KEY` the same command run again with the same key
after a failure sends nothing twice: what was sent comes back with `"replayed": true`.
`results` reads an earlier request's results back from the gateway (nothing is sent), with the
same lines, results file and exit status.

This module is the run of one command: its arguments parsed (arguments.py), the client opened,
the command run (commands.py) into a `Report` (console.py), a failure mapped to its exit status
(exits.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Mapping
from typing import TextIO

import grpc

from .arguments import TOKEN_ENV, build_parser
from .client import CanvasGatewayClient
from .commands import COMMANDS, Command
from .console import Console, Report
from .errors import KeyForgotten, SentAsOneStream, bad_request_violations
from .exits import _RPC_EXITS, EXIT_AUTH, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID
from .inputs import format_of
from .report import ResultsFile, counted
from .rows import InputError


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
        client = CanvasGatewayClient(
            args.target, token, credentials=_credentials(args), connections=getattr(args, "connections", 1)
        )
    except ValueError as error:  # a malformed token, never quoted
        io.error(f"error: {error}")
        return EXIT_AUTH
    except OSError as error:  # an unreadable CA file
        io.error(f"error: {error}")
        return EXIT_INVALID
    report = Report(io, args.validate_only, keyed=bool(args.idempotency_key), target=args.target)
    failed: int | None = None
    command: Command = COMMANDS[args.command]
    try:
        report.results_file = _open_results(args)
        async with client:
            await command(args, client, report, stdin)
    except grpc.aio.AioRpcError as error:
        failed = _report_rpc_error(io, error)
    except InputError as error:
        io.error(f"error: {error}")
        failed = EXIT_INVALID
    except (KeyForgotten, SentAsOneStream) as error:
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
