"""Entrypoint: `python -m canvas_gateway_server [--demo]` (console script canvas-gateway-server)."""

from __future__ import annotations

import asyncio
import os
import sys

from .app import run
from .errors import ConfigError
from .settings import Settings


def main() -> None:
    demo = "--demo" in sys.argv[1:]
    try:
        settings = Settings.from_env(os.environ, **({"demo": True} if demo else {}))
    except ConfigError as exc:
        sys.exit(f"canvas-gateway: {exc}")
    try:
        asyncio.run(run(settings))
    except ConfigError as exc:
        sys.exit(f"canvas-gateway: {exc}")


if __name__ == "__main__":
    main()
