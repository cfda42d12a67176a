"""Entrypoint: `python -m canvas_gateway_server [--demo | --check-config | --version]`
(console script canvas-gateway-server)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from . import __version__, logs
from .app import run
from .errors import ConfigError
from .settings import ENV_PREFIX, Settings
from .tenants import load_tenants
from .workers import supervise, worker_count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="canvas-gateway-server",
        description=(
            f"The canvas-gateway gRPC server. Configure it with {ENV_PREFIX}* environment variables "
            f"or a TOML file named by {ENV_PREFIX}CONFIG_FILE (see README: Configuration); "
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
    parser.add_argument("--version", action="version", version=f"canvas-gateway-server {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ, **({"demo": True} if args.demo else {}))
        if args.check_config:
            check_config(settings)
            return
        if worker_count(settings) > 1 and not settings.is_worker:
            if not settings.demo:
                load_tenants(
                    Path(settings.tenants_file), os.environ
                )  # refuse a bad file once, not per worker
            logs.configure(settings.log_level, settings.log_format)
            sys.exit(asyncio.run(supervise(settings, os.environ)))
        asyncio.run(run(settings))
    except ConfigError as exc:
        sys.exit(f"canvas-gateway: {exc}")


def check_config(settings: Settings) -> None:
    """What --check-config prints: the configuration is valid, and the tenants it serves."""
    if settings.demo:
        print("configuration valid: demo mode (one tenant, 'demo', against an embedded fake Braze)")
        return
    tenants = load_tenants(Path(settings.tenants_file), os.environ)
    ids = sorted(tenants.tenant_ids())
    print(f"configuration valid: {len(ids)} tenant(s): {', '.join(ids)}")


if __name__ == "__main__":
    main()
