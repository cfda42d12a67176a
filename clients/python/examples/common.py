"""What the two examples share: flags, the client, the request, and the output lines of
clients/README.md."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_client import CanvasGatewayClient, bad_request_violations
from google.rpc import code_pb2

EXIT_SENT, EXIT_NOT_SENT, EXIT_USAGE, EXIT_RPC_FAILED = 0, 1, 2, 3


def parse(program: str, argv: Sequence[str]) -> argparse.Namespace:
    """The flags of clients/README.md, and the token from CANVAS_GATEWAY_TOKEN (exit 2 without)."""
    parser = argparse.ArgumentParser(prog=program)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--ca-file")
    parser.add_argument("--canvas-id", default="canvas-gateway-demo")
    parser.add_argument("--recipients", type=int, default=120 if program == "send" else 1000)
    parser.add_argument("--idempotency-key")
    parser.add_argument("--context-keys", type=int, default=0)
    if program == "send":
        parser.add_argument("--bad-email", action="store_true")
    else:
        parser.add_argument("--chunk-size", type=int, default=500)
    args = parser.parse_args(argv)  # exits 2 on a bad flag
    args.token = os.environ.get("CANVAS_GATEWAY_TOKEN", "")
    if not args.token:
        usage(parser, "set CANVAS_GATEWAY_TOKEN to the gateway's bearer token")
    if args.recipients < 0 or getattr(args, "chunk_size", 1) < 1:
        usage(parser, "--recipients must be >= 0 and --chunk-size >= 1")
    if args.context_keys < 0:
        usage(parser, "--context-keys must be >= 0")
    return args


def usage(parser: argparse.ArgumentParser, why: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: {why}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def client(args: argparse.Namespace) -> CanvasGatewayClient:
    """Plaintext, or TLS trusting the system's roots or --ca-file."""
    credentials = None
    if args.ca_file:
        with open(args.ca_file, "rb") as roots:
            credentials = grpc.ssl_channel_credentials(root_certificates=roots.read())
    elif args.tls:
        credentials = grpc.ssl_channel_credentials()
    return CanvasGatewayClient(args.target, args.token, credentials=credentials)


def recipients(count: int, keys: int = 0) -> Iterator[pb.Recipient]:
    """user-<i>, each with the context {"index": i} and `keys` more keys (--context-keys)."""
    for i in range(count):
        recipient = pb.Recipient(external_user_id=f"user-{i}")
        recipient.context.update({"index": i, **more_keys(keys)})
        yield recipient


def trigger(canvas_id: str, keys: int = 0) -> pb.CanvasTrigger:
    message = pb.CanvasTrigger(canvas_id=canvas_id)
    message.context.update({"campaign": "example", **more_keys(keys)})
    return message


def more_keys(count: int) -> dict[str, int]:
    """key-<j>: j. Python's protobuf (upb) writes a map's entries in an order of its own, seeded
    per process: a repeat is the same request in another order."""
    return {f"key-{j}": j for j in range(count)}


def print_result(result: pb.BatchResult) -> None:
    first = result.positions[0] if result.positions else "-"
    print(
        f"result batch={result.batch_index} outcome={pb.Outcome.Name(result.outcome)} "
        f"code={code_pb2.Code.Name(result.code)} recipients={len(result.positions)} first={first} "
        f"dispatch_id={result.braze.dispatch_id or '-'}" + (" replayed=true" if result.replayed else "")
    )


def print_summary(summary: pb.SendSummary) -> None:
    print(
        f"summary recipients={summary.recipients} batches={summary.batches} "
        f"sent={summary.recipients_sent} request_id={summary.request_id or '-'}"
    )


def exit_status(results: Sequence[pb.BatchResult]) -> int:
    return EXIT_SENT if all(r.outcome == pb.OUTCOME_SENT for r in results) else EXIT_NOT_SENT


def report_error(error: grpc.aio.AioRpcError) -> int:
    """The failed RPC and its google.rpc.BadRequest field violations, on stderr."""
    message = " ".join((error.details() or "").split())
    print(f"error code={error.code().name} message={message}", file=sys.stderr)
    for violation in bad_request_violations(error):
        print(f"violation field={violation.field} description={violation.description}", file=sys.stderr)
    return EXIT_RPC_FAILED
