"""Secrets never reach log output, even from exception tracebacks."""

from __future__ import annotations

import io
import logging

import pytest
from canvas_gateway_server import logs
from canvas_gateway_server.logs import SecretFilter
from canvas_gateway_server.redaction import REDACTED, redact
from canvas_gateway_server.tenants import StaticTenantDirectory, Tenant, token_digest

SECRET = "braze-key-abc123"


def test_redact_replaces_every_known_secret() -> None:
    assert redact(f"Invalid API key: {SECRET} ({SECRET})", frozenset({SECRET, ""})) == (
        f"Invalid API key: {REDACTED} ({REDACTED})"
    )


def test_the_log_filter_scrubs_messages_args_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter(lambda: frozenset({SECRET})))
    logger = logging.getLogger("test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("upstream said %s", f"Invalid API key: {SECRET}")
        try:
            raise RuntimeError(f"boom with {SECRET}")
        except RuntimeError:
            logger.exception("failed")
        logger.warning("nothing secret here")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert SECRET not in output
    assert output.count(REDACTED) == 2
    assert "RuntimeError" in output
    assert "nothing secret here" in output


def test_the_gateway_log_handler_redacts_every_tenant_key(capsys: pytest.CaptureFixture[str]) -> None:
    tenant = Tenant(id="acme", braze_rest_url="https://rest.iad-01.braze.com", braze_api_key=SECRET)
    directory = StaticTenantDirectory([(tenant, [token_digest("t")])])
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "text", directory.secrets)
        logging.getLogger("canvas_gateway_server.test").warning("Braze said: Invalid API key: %s", SECRET)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Invalid API key: [REDACTED]" in err
    assert SECRET not in err
