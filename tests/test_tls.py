"""TLS on the gRPC port: bearer tokens never cross a network in clear text when configured."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
from canvas_gateway_client import CanvasGatewayClient
from canvas_gateway_client.cli import run
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import Settings
from support import LOCAL, TOKENS, Harness

TLS = Path(__file__).resolve().parent / "fixtures" / "tls"  # a self-signed test certificate for localhost
CERT, KEY = TLS / "localhost.crt", TLS / "localhost.key"
BODY = {"canvas_id": "c", "recipients": [{"external_user_id": "u1"}]}
WITH_TLS = {"tls_cert_file": str(CERT), "tls_key_file": str(KEY)}


@pytest.mark.parametrize("settings_overrides", [WITH_TLS])
async def test_a_tls_client_is_served(harness: Harness) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=CERT.read_bytes())
    async with CanvasGatewayClient(
        f"localhost:{harness.gateway.port}", TOKENS["acme"], credentials=credentials
    ) as c:
        reply = await c.send(BODY, timeout=10)
    assert reply.summary.recipients_sent == 1


@pytest.mark.parametrize("settings_overrides", [WITH_TLS])
async def test_a_plaintext_client_is_not(harness: Harness) -> None:
    async with CanvasGatewayClient(f"localhost:{harness.gateway.port}", TOKENS["acme"]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.send(BODY, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert harness.fake.calls == []


@pytest.mark.parametrize("settings_overrides", [WITH_TLS])
async def test_the_cli_trusts_a_ca_file(harness: Harness, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text('{"canvas_id": "c", "recipients": [{"external_user_id": "u1"}]}')
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "--target",
        f"localhost:{harness.gateway.port}",
        "--ca-file",
        str(CERT),
        "send",
        "--file",
        str(body),
    ]
    code = await run(argv, environ={"CANVAS_GATEWAY_TOKEN": TOKENS["acme"]}, stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert '"outcome":"OUTCOME_SENT"' in out.getvalue()


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="TLS_KEY_FILE"):
        Settings.from_env({"CGW_DEMO": "1", "CGW_TLS_CERT_FILE": str(CERT)})


async def test_a_file_that_is_not_pem_is_a_clear_boot_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    settings = Settings.from_env(
        {},
        demo=True,
        demo_braze_port=0,
        grpc_address="127.0.0.1:0",
        tls_cert_file=str(junk),
        tls_key_file=str(junk),
        **LOCAL,
    )
    with pytest.raises(ConfigError, match="PEM"):
        await Gateway.start(settings)
