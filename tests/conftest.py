"""Fixtures only: a real fake Braze and a real gateway, both on 127.0.0.1 (the helpers they use,
and tests use, are in support.py; no test imports this module).

Three tenants, each with its own bearer token and Braze key, loaded from a tenants file like
production: `acme` (recipients only), `globex` (may broadcast), and `initech`, whose workspace
takes the context object under its legacy name `canvas_entry_properties`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.settings import Settings
from fake_braze import FakeBraze, FakeBrazeConfig
from support import FAKE_URLS, KEYS, LOCAL, Harness, tenants_toml


@pytest.fixture
def fake_config() -> FakeBrazeConfig:
    return FakeBrazeConfig(api_keys=frozenset(KEYS.values()))


@pytest.fixture
async def fake(fake_config: FakeBrazeConfig) -> AsyncIterator[FakeBraze]:
    braze = FakeBraze(fake_config)
    FAKE_URLS[id(braze)] = await braze.start("127.0.0.1", 0)
    yield braze
    await braze.stop()
    FAKE_URLS.pop(id(braze), None)


@pytest.fixture
def clock() -> Callable[[], float]:
    """The harness gateway's clock for budgets and pauses: real time, unless a test stands it still
    with the fake's (`standing_clock`)."""
    return time.time


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change the gateway's settings."""
    return {}


@pytest.fixture
async def harness(
    fake: FakeBraze, tmp_path: Path, settings_overrides: dict[str, Any], clock: Callable[[], float]
) -> AsyncIterator[Harness]:
    url = FAKE_URLS[id(fake)]
    tenants_file = tmp_path / "tenants.toml"
    tenants_file.write_text(tenants_toml(url))
    settings = Settings.from_env(
        {},
        grpc_address="127.0.0.1:0",
        tenants_file=str(tenants_file),
        retry_base_delay_seconds=0.01,
        **{**LOCAL, **settings_overrides},
    )
    gateway = await Gateway.start(settings, environ={"ACME_BRAZE_KEY": KEYS["acme"]}, clock=clock)
    target = f"127.0.0.1:{gateway.port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield Harness(gateway, fake, channel, pb_grpc.CanvasGatewayServiceStub(channel), target)
    finally:
        await channel.close()
        await gateway.stop(grace=0)
