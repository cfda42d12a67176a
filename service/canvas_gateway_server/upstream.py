"""The one I/O seam to Braze: POST {tenant url}/canvas/trigger/send on a pooled session.

The session (keep-alive TCPConnector pool, with the trace hook that tells when a request
has gone out) is made once by `open_session`, called from `app`, and handed in. A call
never raises for network trouble: it returns a Reply that says whether anything can have
reached Braze, because that decides what is safe to retry (CONTRACT.md section 6).
Braze's 401 text echoes the key it was sent, so every response body is scrubbed of the
tenant's key before it is parsed.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final, Protocol

import aiohttp
import orjson
import yarl

from .braze import TRIGGER_PATH
from .redaction import REDACTED
from .tenants import Tenant

_RESET_SLACK: Final = 2 * 3600  # Braze's longest window is an hour; allow for clock skew
_MAX_TARGETS: Final = 4096


class Delivery(enum.Enum):
    """How far a call got."""

    RESPONDED = "responded"
    """Braze (or a proxy in front of it) answered with an HTTP status."""
    NOT_SENT = "not_sent"
    """The connection could not be opened: nothing reached Braze."""
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


class Progress(Protocol):
    """Told when a call's request starts going out: from then on it may reach Braze."""

    sent: bool


async def _mark_sent(_: object, context: SimpleNamespace, __: object) -> None:
    progress = context.trace_request_ctx
    if progress is not None:
        progress.sent = True


def open_session(pool_size: int, keepalive_seconds: float = 30.0) -> aiohttp.ClientSession:
    """The one pooled keep-alive session to every tenant's Braze, with the trace hook that tells
    a call's Progress when its headers are written.

    Waiting for a pooled connection, connecting and the TLS handshake send nothing, so a call
    cut short there is known not to have reached Braze.
    """
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_mark_sent)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=pool_size, keepalive_timeout=keepalive_seconds),
        skip_auto_headers=("User-Agent",),
        trace_configs=[trace],
        # One session serves every tenant: a cookie one tenant's Braze set must never travel
        # with another tenant's call (and Braze's API uses none).
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class BrazeClient:
    """Sends trigger bodies for tenants over one shared, pooled session from `open_session`."""

    def __init__(self, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        self._session = session
        self._timeout = timeout
        self._targets: dict[tuple[str, str], tuple[yarl.URL, Mapping[str, str]]] = {}

    def _target(self, tenant: Tenant) -> tuple[yarl.URL, Mapping[str, str]]:
        """The tenant's parsed endpoint URL and headers, made once (parsing a URL on every call
        costs more than the rest of the request's setup)."""
        key = (tenant.braze_rest_url, tenant.braze_api_key)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) >= _MAX_TARGETS:  # reloads that change every key: start over
                self._targets.clear()
            headers = {"Authorization": f"Bearer {tenant.braze_api_key}", "Content-Type": "application/json"}
            target = self._targets[key] = (yarl.URL(tenant.braze_rest_url + TRIGGER_PATH), headers)
        return target

    async def trigger(
        self, tenant: Tenant, body: bytes, progress: Progress | None = None, time_left: float = math.inf
    ) -> Reply:
        """POST one batch body with the tenant's key; never raises for network failures.

        `time_left` (a caller's deadline) shortens the call's total timeout when it is sooner."""
        timeout = self._timeout
        if time_left < (timeout.total or math.inf):
            timeout = aiohttp.ClientTimeout(total=time_left, connect=timeout.connect)
        url, headers = self._target(tenant)
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                trace_request_ctx=progress,
            ) as response:
                raw = await response.read()
                return _reply(response.status, response.headers, raw, tenant.braze_api_key, time.time())
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL) as exc:
            return Reply(Delivery.NOT_SENT, failure=type(exc).__name__)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Reply(Delivery.UNKNOWN, failure=type(exc).__name__)


def _reply(status: int, headers: Mapping[str, str], raw: bytes, api_key: str, now: float) -> Reply:
    secret = api_key.encode()
    if secret in raw:
        raw = raw.replace(secret, REDACTED.encode())
    body: Mapping[str, Any] | None
    try:
        parsed = orjson.loads(raw) if raw else None
        body = parsed if isinstance(parsed, dict) else None
    except orjson.JSONDecodeError:
        body = None
    return Reply(
        Delivery.RESPONDED,
        status=status,
        body=body,
        rate=parse_rate_limit(headers, now),
        content_type=headers.get("content-type", ""),
    )
