"""Entrypoint: `python -m canvas_gateway_server [--demo | --check-config | --accept-lost-keys |
--version]` (console script canvas-gateway-server).

SIGHUP is caught before anything else (`hangups`); the modules that take about a second to import
(gRPC, aiohttp, redis) are imported after it, where they are used."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from . import __version__, logs
from .errors import ConfigError
from .hangups import Hangups
from .settings import ENV_PREFIX, Settings, WorkerRole
from .tenants import load_tenants


def main(argv: list[str] | None = None) -> None:
    hangups = Hangups.catch()  # first: SIGHUP's default action would end the process while it starts
    try:
        _main(argv, hangups)
    finally:
        hangups.release()


def _main(argv: list[str] | None, hangups: Hangups) -> None:
    parser = argparse.ArgumentParser(
        prog="canvas-gateway-server",
        description=(
            f"The canvas-gateway gRPC server. Configure it with {ENV_PREFIX}* environment variables "
            f"or a TOML file named by {ENV_PREFIX}CONFIG_FILE (see docs/configuration.md); "
            f"{ENV_PREFIX}TENANTS_FILE names the tenants."
        ),
    )
    parser.add_argument(
        "--demo", action="store_true", help="run against an embedded fake Braze with one demo tenant"
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="load the settings and the tenants file, resolve every Braze key, print the tenant ids "
        "that would be served, and exit 0 (or 1 with the reason) without serving",
    )
    parser.add_argument(
        "--accept-lost-keys",
        action="store_true",
        help="acknowledge that Redis (CGW_REDIS_URL) lost the idempotency keys' results (it restarted "
        "without its data): every gateway takes keys again, and a repeat of a key used before the "
        "loss sends its batches again; then exit",
    )
    parser.add_argument("--version", action="version", version=f"canvas-gateway-server {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ, **({"demo": True} if args.demo else {}))
        worker = WorkerRole.from_env(os.environ)
        if args.check_config:
            check_config(settings)
            return
        if args.accept_lost_keys:
            from .stores.wiring import accept_lost_keys

            print(asyncio.run(accept_lost_keys(settings.state)))
            return
        from .serve import run
        from .stores.wiring import connect_redis
        from .tracing import exporters
        from .workers import supervise, worker_count

        if worker_count(settings) > 1 and worker is None:
            # Refuse a bad tenants file, Redis URL or OTEL_TRACES_EXPORTER once, not per worker.
            connect_redis(settings.state)
            check_egress(settings)
            exporters(os.environ)
            if not settings.tenants.demo:
                load_tenants(Path(settings.tenants.file), os.environ)
            logs.configure(settings.telemetry.log_level, settings.telemetry.log_format)
            sys.exit(asyncio.run(supervise(settings, os.environ, hangups)))
        asyncio.run(run(settings, worker, hangups=hangups))
    except ConfigError as exc:
        sys.exit(f"canvas-gateway: {exc}")


def check_egress(settings: Settings) -> None:
    """Refuse a proxy variable (HTTPS_PROXY, ...) or CA file the gateway could not use, as its boot would."""
    from .egress import Egress
    from .upstream import tls_context

    upstream = settings.upstream
    Egress.from_settings(upstream.proxy, upstream.no_proxy, os.environ)
    tls_context(upstream.ca_file)


def check_config(settings: Settings) -> None:
    """What --check-config prints: the configuration is valid, and the tenants it serves."""
    from .stores.wiring import connect_redis
    from .tracing import exporters

    connect_redis(settings.state)  # a URL redis-py would refuse is refused here too
    check_egress(settings)
    exporters(os.environ)  # an exporter the gateway cannot run is refused at boot too
    if settings.tenants.demo:
        print("configuration valid: demo mode (one tenant, 'demo', against an embedded fake Braze)")
        return
    tenants = load_tenants(Path(settings.tenants.file), os.environ)
    ids = sorted(tenants.tenant_ids())
    print(f"configuration valid: {len(ids)} tenant(s): {', '.join(ids)}")


if __name__ == "__main__":
    main()
