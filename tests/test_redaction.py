"""Secrets never reach log output, even from exception tracebacks."""

from __future__ import annotations

import io
import logging

from canvas_gateway_server.redaction import REDACTED, SecretFilter, redact

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
