"""Entrypoint: `python -m canvas_gateway_server [--demo]` (console script canvas-gateway-server)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from .app import run
from .errors import ConfigError
from .settings import ENV_PREFIX, Settings


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
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ, **({"demo": True} if args.demo else {}))
        asyncio.run(run(settings))
    except ConfigError as exc:
        sys.exit(f"canvas-gateway: {exc}")


if __name__ == "__main__":
    main()
