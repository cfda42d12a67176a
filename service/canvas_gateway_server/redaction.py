"""Keeps secrets (Braze keys, caller tokens) out of logs and texts.

Braze keys are scrubbed from response bodies in `upstream`; this filter is the second
line: it rewrites any log record that would print a known secret.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

REDACTED: Final = "[REDACTED]"


def redact(text: str, secrets: frozenset[str]) -> str:
    """`text` with every occurrence of every secret replaced."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """A logging filter that redacts the secrets a callable returns (read per record)."""

    def __init__(self, secrets: Callable[[], frozenset[str]]) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets()
        message = record.getMessage()
        cleaned = redact(message, secrets)
        if cleaned != message or record.exc_info:
            if record.exc_info:
                formatter = logging.Formatter()
                cleaned += "\n" + redact(formatter.formatException(record.exc_info), secrets)
                record.exc_info = None
                record.exc_text = None
            record.msg = cleaned
            record.args = None
        return True
