"""The one I/O seam to Braze: POST {tenant url}/canvas/trigger/send on a pooled session.

The session (keep-alive TCPConnector pool, with the trace hook that tells when a request
has gone out) is made once by `open_session`, called from `app`, and handed in. A call
never raises for network trouble: it returns a Reply that says whether anything can have
reached Braze, because that decides what is safe to retry (CONTRACT.md section 6).
Braze's 401 text echoes the key it was sent, so every response body is scrubbed of the
tenant's key before it is parsed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp
import orjson
import yarl

from . import tracing
from .braze import TRIGGER_PATH
from .redaction import REDACTED
from .reply import Delivery, Reply, parse_rate_limit
from .tenants import Tenant

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

_MAX_TARGETS: Final = 4096


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
    """Sends trigger bodies for tenants over one shared, pooled session from `open_session`; with a
    `tracer`, each call in a client span (`tracing`), its `traceparent` sent only to tenants that
    opted in (`propagate_trace`)."""

    def __init__(
        self, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout, tracer: Tracer | None = None
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._tracer = tracer
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
        if self._tracer is None:
            return await self._post(tenant, body, progress, time_left)
        span = tracing.start_client_span(self._tracer, self._target(tenant)[0])
        reply = Reply(Delivery.UNKNOWN, failure="CancelledError")
        try:
            extra = tracing.propagation_headers(span) if tenant.propagate_trace else None
            reply = await self._post(tenant, body, progress, time_left, extra)
            return reply
        finally:
            tracing.end_client_span(span, reply)

    async def _post(
        self,
        tenant: Tenant,
        body: bytes,
        progress: Progress | None,
        time_left: float,
        extra: Mapping[str, str] | None = None,
    ) -> Reply:
        timeout = self._timeout
        if time_left < (timeout.total or math.inf):
            timeout = aiohttp.ClientTimeout(total=time_left, connect=timeout.connect)
        url, headers = self._target(tenant)
        if extra:
            headers = {**headers, **extra}
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
