"""Demo mode (CGW_DEMO): an embedded fake Braze with one tenant and a public token. Never in production;
production never imports the fake."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .egress import DIRECT_WORD
from .errors import ConfigError
from .tenants import StaticTenantDirectory, Tenant, TenantDirectory, token_digest

if TYPE_CHECKING:
    from fake_braze import FakeBraze

log = logging.getLogger(__name__)

DEMO_TOKEN = "demo-token"  # noqa: S105 - a documented demo credential for the embedded fake only
DEMO_BRAZE_KEY = "demo-braze-key"


async def start_demo_braze(port: int) -> tuple[FakeBraze, TenantDirectory]:
    """The fake Braze, started on 127.0.0.1:`port` (CGW_DEMO_BRAZE_PORT), and its one tenant."""
    from fake_braze import FakeBraze, FakeBrazeConfig  # demo only: production never loads the fake

    fake = FakeBraze(FakeBrazeConfig(api_keys=frozenset({DEMO_BRAZE_KEY})))
    try:
        url = await fake.start("127.0.0.1", port)
    except OSError as exc:
        raise ConfigError(
            f"cannot start the demo fake Braze on 127.0.0.1:{port} ({exc.strerror}); "
            "is another demo running? CGW_DEMO_BRAZE_PORT picks another port"
        ) from None
    # The embedded fake is this host's: never through a proxy the environment names.
    tenant = Tenant(
        id="demo", braze_rest_url=url, braze_api_key=DEMO_BRAZE_KEY, allow_broadcast=True, proxy=DIRECT_WORD
    )
    log.warning("DEMO MODE: sending to the embedded fake Braze at %s, not to Braze", url)
    return fake, StaticTenantDirectory([(tenant, [token_digest(DEMO_TOKEN)])])


def demo_banner(host: str, port: int) -> str:
    """What a demo prints once it serves: how to try it."""
    return (
        f"\ncanvas-gateway demo on {host}:{port} (tenant 'demo', token '{DEMO_TOKEN}').\n"
        "Try it from another shell:\n"
        "  make demo\n"
        f"  .venv/bin/canvas-gateway --target {host}:{port} --token {DEMO_TOKEN} "
        "send --file examples/recipients.json\n"
    )
