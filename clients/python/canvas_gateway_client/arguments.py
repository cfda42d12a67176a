"""The `canvas-gateway` command's arguments: the parser, its flags and the texts its --help
prints after them."""

from __future__ import annotations

import argparse
from importlib import metadata

from .exits import EXIT_STATUS
from .inputs import FORMATS
from .recipients import DEFAULT_CHUNK_SIZE

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "CANVAS_GATEWAY_TOKEN"  # noqa: S105 - the name of the variable, not a secret
DEMO_CANVAS_ID = "canvas-gateway-demo"
DEFAULT_CONNECTIONS = 4
"""Connections a send-stream spreads over: the gateway's workers (CGW_WORKERS, one per core by
default) each take the connections the kernel hands them, so a few more than its workers keep
them all busy."""

IDEMPOTENCY = """\
idempotency keys (--idempotency-key KEY, 1 to 128 of A-Z a-z 0-9 . _ : -, your tenant's own):
  the gateway keeps each batch's final result under the key (24 h by default). After a
  failure (exit 4 or 5, Ctrl-C, a crash), run the same command again with the same KEY and
  the same input: nothing is sent twice. Batches that had a result come back with
  "replayed": true (UNKNOWN stays UNKNOWN: it may have been sent); only the others are sent.
  A new request needs a new key: another body under a used key is REJECTED
  (FAILED_PRECONDITION) and not sent.
"""
CSV_LAYOUT = """\
CSV recipients (--format csv, or a .csv file): a header row, then one recipient a row.
  external_user_id | email | alias_name + alias_label   exactly one identifier a row
  prioritization                                      values separated by |
  send_to_existing_only                               true or false
  context.<key>, attributes.<key>,                    one key of that object each
  canvas_entry_properties.<key>
Cells are strings; an empty cell is left out. A column <name>:json (context.total:json)
holds JSON values, so numbers, booleans, lists and objects keep their type.
Every row ends sent, a bad row (INVALID_INPUT) or not read (NOT_READ), with its line in the
--results file; blank lines and rows of empty cells are skipped. A quote that does not close
where a row could end makes its row bad and the lines it swallowed NOT_READ.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _version() -> str:
    try:
        return metadata.version("canvas-gateway-client")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def _stream_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-size", type=_positive, default=DEFAULT_CHUNK_SIZE, help="recipients a message"
    )
    parser.add_argument(
        "--resumes",
        type=_not_negative,
        default=5,
        help="streams a draining gateway may end before the send gives up (default 5); on each, "
        "the recipients without a result go on in a new stream, none sent twice. With "
        "--idempotency-key (and not from stdin), after a drain or a lost connection the whole "
        "input is sent again from the start under the key instead (batches with a result come "
        "back replayed and are not printed twice), and a batch another call is sending is "
        "tried again after the delay the gateway gives",
    )
    parser.add_argument(
        "--connections",
        type=_positive,
        default=DEFAULT_CONNECTIONS,
        metavar="N",
        help="spread the send over N connections, a stream on each at once, so that every worker "
        f"of the gateway (CGW_WORKERS) sends (default {DEFAULT_CONNECTIONS}; at least the gateway's "
        "workers). The input goes in parts of 5,000 recipients, a stream each; above 1 the results "
        "come in position order. The parts do not depend on N: run again with another N under the "
        "same --idempotency-key and nothing is sent twice",
    )
    _key_option(
        parser,
        "makes running the command again safe: after a failure, run it again with the same KEY "
        "and input, and nothing is sent twice (results the gateway kept come back with "
        '"replayed": true); also lets a stream the gateway ends resume from the start '
        "(--resumes)",
    )


def _key_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--idempotency-key", metavar="KEY", help=text + "; see below")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `canvas-gateway`."""
    parser = argparse.ArgumentParser(
        prog="canvas-gateway",
        description="Trigger Braze Canvases through canvas-gateway.",
        epilog=EXIT_STATUS + "\n" + IDEMPOTENCY + "\n" + CSV_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"gateway address (default {DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--token", help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable, argv is visible to ps)"
    )
    parser.add_argument("--timeout", type=float, help="deadline of the whole send in seconds (default: none)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CA roots)")
    parser.add_argument("--ca-file", help="PEM CA certificates to trust; implies --tls")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def results_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--results", help="write one row per recipient to FILE (JSON Lines, or CSV for .csv)"
        )
        command.add_argument("--results-format", choices=FORMATS, help="the results file's format")
        command.add_argument(
            "--dry-run",
            "--validate-only",
            dest="validate_only",
            action="store_true",
            help="validate and plan the batches, send nothing",
        )

    send = commands.add_parser(
        "send",
        help="send one Braze JSON body with the unary Send",
        epilog=EXIT_STATUS + "\n" + IDEMPOTENCY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("--file", required=True, help="Braze /canvas/trigger/send JSON body (- for stdin)")
    results_options(send)
    _key_option(
        send,
        "makes running the command again safe: after a failure, run it again with the same KEY "
        'and body, and nothing is sent twice (results the gateway kept come back with "replayed": true)',
    )

    stream = commands.add_parser(
        "send-stream",
        help="stream recipients from a JSON Lines or CSV file",
        epilog=EXIT_STATUS + "\n" + IDEMPOTENCY + "\n" + CSV_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stream.add_argument("--header", required=True, help="Braze JSON body: canvas_id, context, audience...")
    stream.add_argument(
        "--recipients", required=True, help="JSON Lines or CSV, a recipient a row (- for stdin)"
    )
    stream.add_argument(
        "--format", choices=FORMATS, help="the recipients' format (default: by extension, else jsonl)"
    )
    stream.add_argument(
        "--max-bad-rows",
        type=_not_negative,
        default=0,
        help="bad rows to report and skip; the one after ends the input there, and the rows after it "
        "are reported not read (exit status 6) (default 0)",
    )
    _progress_options(stream)
    results_options(stream)
    _stream_options(stream)

    demo = commands.add_parser(
        "send-demo",
        help="stream synthetic recipients demo-user-<n>",
        epilog=IDEMPOTENCY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--recipients", type=_positive, default=1000, help="how many (default 1000)")
    demo.add_argument("--canvas-id", default=DEMO_CANVAS_ID, help=f"Canvas id (default {DEMO_CANVAS_ID})")
    _progress_options(demo)
    _stream_options(demo)
    demo.set_defaults(validate_only=False)

    results = commands.add_parser(
        "results",
        help="read back an earlier request's results from the gateway (nothing is sent)",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    named = results.add_mutually_exclusive_group(required=True)
    named.add_argument("--idempotency-key", metavar="KEY", help="the request's idempotency key")
    named.add_argument(
        "--request-id", metavar="ID", help="the request's id (its summary's request_id, or x-request-id)"
    )
    results.add_argument(
        "--results", help="write one row per recipient to FILE (JSON Lines, or CSV for .csv)"
    )
    results.add_argument("--results-format", choices=FORMATS, help="the results file's format")
    results.set_defaults(validate_only=False)

    unknown = commands.add_parser(
        "unknown", help="list your UNKNOWN batches that no acknowledged replay has sent again"
    )
    unknown.set_defaults(validate_only=False, idempotency_key=None)

    replay = commands.add_parser(
        "replay",
        help="send UNKNOWN batches of an earlier request again, once: a recipient may get the Canvas twice",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    named = replay.add_mutually_exclusive_group(required=True)
    named.add_argument("--idempotency-key", metavar="KEY", help="the request's idempotency key")
    named.add_argument("--request-id", metavar="ID", help="the request's id")
    replay.add_argument(
        "--batch",
        type=int,
        action="append",
        metavar="N",
        help="a batch to send again (repeat it); default: every UNKNOWN one",
    )
    replay.add_argument(
        "--acknowledge-duplicates",
        action="store_true",
        help="required: you accept that a recipient of these batches may get the Canvas twice",
    )
    replay.add_argument("--results", help="write one row per recipient to FILE (JSON Lines, or CSV for .csv)")
    replay.add_argument("--results-format", choices=FORMATS, help="the results file's format")
    replay.set_defaults(validate_only=False)
    return parser


def _progress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")
    parser.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, a progress line this often (default 10)",
    )
