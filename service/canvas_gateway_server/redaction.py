"""Keeps secrets (Braze keys, caller tokens) out of logs and texts.

Braze keys are scrubbed from response bodies in `upstream`; `logs.SecretFilter` is the
second line: it rewrites any log record that would print a known secret.
"""

from __future__ import annotations

from typing import Final

REDACTED: Final = "[REDACTED]"


def redact(text: str, secrets: frozenset[str]) -> str:
    """`text` with every occurrence of every secret replaced."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text
