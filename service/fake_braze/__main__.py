"""Run the fake Braze alone (console script `fake-braze`).

    python -m fake_braze --port 9700 --api-key demo-braze-key \\
        [--key-without-permission KEY] [--canvas ID] [--other-canvas ID] \\
        [--paused-canvas ID] [--archived-canvas ID] [--hourly-limit N] [--hourly-window-seconds S] \\
        [--audience-budget any_audience|broadcast_only] \\
        [--other-consumer api_key=KEY,pool=hourly,share=0.3,per_second=2 ...] \\
        [--latency-ms N] [--error-rate 503=0.1 ...] [--reset-rate 0.05] [--seed N]

Without `--canvas`, any canvas id is a known API-triggered Canvas (the demo relies on
this). It prints `fake Braze listening on <url>` once it accepts connections and stops
cleanly on SIGINT or SIGTERM. It refuses a non-loopback host unless
`--allow-remote` is given, because it has no real authentication.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

from canvas_gateway_server.loopback import is_loopback

from .app import FakeBraze, FakeBrazeConfig
from .consumers import ConsumerError, OtherConsumer, from_spec


def _error_rate(text: str) -> tuple[int, float]:
    status, sep, rate = text.partition("=")
    if not sep or not status.isdigit():
        raise argparse.ArgumentTypeError(f"expected STATUS=RATE such as 503=0.1, got {text!r}")
    return int(status), float(rate)


def _other_consumer(text: str) -> OtherConsumer:
    try:
        return from_spec(text)
    except ConsumerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="fake-braze", description="A fake Braze POST /canvas/trigger/send on loopback."
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    add("--port", type=int, default=9700, help="listen port, 0 for any free port (default 9700)")
    add("--api-key", action="append", required=True, metavar="KEY", help="a valid REST API key (repeatable)")
    add(
        "--key-without-permission",
        action="append",
        default=[],
        metavar="KEY",
        help="a key that authenticates but lacks canvas.trigger.send: 403 (repeatable)",
    )
    add(
        "--canvas",
        action="append",
        metavar="ID",
        help="an API-triggered canvas (repeatable); without any, every canvas id is one",
    )
    add(
        "--other-canvas",
        action="append",
        default=[],
        metavar="ID",
        help="a canvas that exists but is not API-triggered: 400 (repeatable)",
    )
    add("--paused-canvas", action="append", default=[], metavar="ID", help="repeatable")
    add("--archived-canvas", action="append", default=[], metavar="ID", help="repeatable")
    add("--hourly-limit", type=int, default=250_000, help="recipient requests per key per hour")
    add(
        "--hourly-window-seconds",
        type=int,
        default=3600,
        help="the length of that window, aligned to the epoch like the hour (benchmarks: e.g. 5)",
    )
    add("--broadcast-per-minute", type=int, default=250, help="broadcast requests per key")
    add("--broadcast-per-audience", type=int, default=10, help="per minute per unique audience")
    add(
        "--audience-budget",
        choices=("any_audience", "broadcast_only"),
        default="any_audience",
        help="which calls with an `audience` spend the broadcast limits, as the gateway's tenant"
        " setting of that name (default any_audience: every one; broadcast_only: broadcasts only)",
    )
    add(
        "--other-consumer",
        type=_other_consumer,
        action="append",
        default=[],
        metavar="SPEC",
        help="another service spending a key's pool: api_key=KEY[,pool=hourly|broadcast]"
        "[,share=0.3][,per_second=N] (repeatable; share: of each window as it starts)",
    )
    add("--latency-ms", type=float, default=0.0, help="added to every request")
    add(
        "--error-rate",
        type=_error_rate,
        action="append",
        default=[],
        metavar="STATUS=RATE",
        help="answer this share of requests with STATUS, e.g. 503=0.1 (repeatable)",
    )
    add("--reset-rate", type=float, default=0.0, help="share of connections to drop")
    add("--seed", type=int, default=None, help="seed for the random faults")
    add("--no-record", action="store_true", help="keep counters only, not every call")
    add("--allow-remote", action="store_true", help="allow a non-loopback --host")
    return parser


def config_from_args(args: argparse.Namespace) -> FakeBrazeConfig:
    """Build the config; raises ValueError on a bad combination."""
    return FakeBrazeConfig(
        api_keys=frozenset(args.api_key),
        keys_without_permission=frozenset(args.key_without_permission),
        canvases=None if args.canvas is None else frozenset(args.canvas),
        other_canvases=frozenset(args.other_canvas),
        paused_canvases=frozenset(args.paused_canvas),
        archived_canvases=frozenset(args.archived_canvas),
        hourly_limit=args.hourly_limit,
        hourly_window_seconds=args.hourly_window_seconds,
        broadcast_per_minute=args.broadcast_per_minute,
        broadcast_per_minute_per_audience=args.broadcast_per_audience,
        audience_calls_on_broadcast_budget=args.audience_budget == "any_audience",
        other_consumers=tuple(args.other_consumer),
        latency_seconds=args.latency_ms / 1000,
        error_rates=dict(args.error_rate),
        reset_rate=args.reset_rate,
        seed=args.seed,
        record=not args.no_record,
    )


async def serve(config: FakeBrazeConfig, host: str, port: int) -> None:
    """Run until SIGINT or SIGTERM."""
    fake = FakeBraze(config)
    try:
        url = await fake.start(host, port)
    except OSError as exc:
        raise SystemExit(f"fake-braze: cannot listen on {host}:{port} ({exc.strerror})") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"fake Braze listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.allow_remote and not is_loopback(args.host):
        parser.error(f"refusing non-loopback host {args.host!r}; pass --allow-remote to insist")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
