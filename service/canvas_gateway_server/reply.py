"""What one call to Braze came back with, as values: how far it got, its status and body, and
Braze's rate-limit headers. Pure: `upstream` makes them, the policies read them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

_RESET_SLACK: Final = 2 * 3600  # Braze's longest window is an hour; allow for clock skew


class Delivery(enum.Enum):
    """How far a call got."""

    RESPONDED = "responded"
    """Braze (or a proxy in front of it) answered with an HTTP status."""
    NOT_SENT = "not_sent"
    """The connection could not be opened (to Braze, or through a proxy: to the proxy, or the proxy
    refused the CONNECT): nothing reached Braze."""
    UNKNOWN = "unknown"
    """The call failed after the request may have been written."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Braze's x-ratelimit-* headers; None where missing, empty or unparsable."""

    limit: int | None = None
    remaining: int | None = None
    reset: int | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """The result of one call. `body` is the parsed JSON object, or None."""

    delivery: Delivery
    status: int = 0
    body: Mapping[str, Any] | None = None
    rate: RateLimit = RateLimit()
    failure: str = ""
    """For replies without a response: the kind of failure (never a secret)."""
    content_type: str = ""


def _header_number(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def parse_rate_limit(headers: Mapping[str, str], now: float) -> RateLimit:
    """Read x-ratelimit-* (any case). Braze sends empty strings on a 401: those are unknown,
    and so is a reset that is not epoch seconds within Braze's windows (an hour) of `now`."""
    reset = _header_number(headers, "x-ratelimit-reset")
    if reset is not None and not now - _RESET_SLACK <= reset <= now + _RESET_SLACK:
        reset = None
    retry_after: float | None = None
    for name in ("retry-after", "x-ratelimit-retry-after"):
        raw = headers.get(name, "").strip()
        try:
            retry_after = float(raw) if raw else retry_after
        except ValueError:
            continue
    return RateLimit(
        limit=_header_number(headers, "x-ratelimit-limit"),
        remaining=_header_number(headers, "x-ratelimit-remaining"),
        reset=reset,
        retry_after=retry_after,
    )
