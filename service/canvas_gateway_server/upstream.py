"""The one I/O seam to Braze: POST {tenant url}/canvas/trigger/send on a pooled session.

The session (keep-alive TCPConnector pool, with the trace hook that tells when a request
has gone out) is made once by `open_session`, called from `app`, and handed in; each tenant's
route (direct, or which proxy) is decided once by `egress`. A call
never raises for network trouble: it returns a Reply that says whether anything can have
reached Braze, because that decides what is safe to retry (CONTRACT.md section 6).
Braze's 401 text echoes the key it was sent, so every response body is scrubbed of the
tenant's key before it is parsed.

A call may be given `leaving`, asked once its connection is in hand (taken from the pool, or
connected: TCP, a proxy's CONNECT, TLS) and before its first byte is written; the dispatcher
records there, under an idempotency key, that the batch may leave (`idempotency`). Waiting for
the pool and connecting then come before that mark, not between it and the bytes leaving: a
gateway killed while it waits or connects leaves a batch that is sent again, not one UNKNOWN.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

import aiohttp
import orjson
import yarl
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from . import tracing
from .braze import TRIGGER_PATH
from .egress import Egress
from .errors import ConfigError
from .redaction import REDACTED
from .reply import Delivery, Reply, parse_rate_limit
from .tenants import Tenant

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

_MAX_TARGETS: Final = 4096
STOPPED: Final = "stopped before sending: its leaving check said no"
"""A Reply's failure when the call's `leaving` said no: nothing was written."""

Leaving = Callable[[], Awaitable[bool]]
"""Asked once a call's connection is in hand, just before its first byte is written: True lets
the call go; False ends it NOT_SENT. It is asked at most once per call."""

_LEAVING: ContextVar[Leaving | None] = ContextVar("canvas_gateway_leaving", default=None)
"""The `leaving` of the call this task is making: how `_LeavingConnector` finds it."""


class Progress(Protocol):
    """Told when a call's request starts going out: from then on it may reach Braze."""

    sent: bool


async def _mark_sent(_: object, context: SimpleNamespace, __: object) -> None:
    progress = context.trace_request_ctx
    if progress is not None:
        progress.sent = True


def open_session(pool_size: int, keepalive_seconds: float = 30.0, ca_file: str = "") -> aiohttp.ClientSession:
    """The one pooled keep-alive session to every tenant's Braze, with the trace hook that tells
    a call's Progress when its headers are written; `ca_file`: the CAs trusted for Braze's TLS in
    place of the system's.

    Waiting for a pooled connection, connecting (to a proxy too), a proxy's CONNECT and the TLS
    handshake send nothing, so a call cut short there is known not to have reached Braze (the
    CONNECT is not traced: only the request to Braze marks the Progress).
    """
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_mark_sent)
    return aiohttp.ClientSession(
        connector=_LeavingConnector(
            limit=pool_size, keepalive_timeout=keepalive_seconds, ssl=tls_context(ca_file)
        ),
        # Proxies come from `egress`, once per Braze URL, never from the environment per call.
        trust_env=False,
        skip_auto_headers=("User-Agent",),
        trace_configs=[trace],
        # One session serves every tenant: a cookie one tenant's Braze set must never travel
        # with another tenant's call (and Braze's API uses none).
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class _Stopped(Exception):
    """A call's `leaving` said no: nothing was written."""


class _LeavingConnector(aiohttp.TCPConnector):
    """The pool, asking the call's `leaving` (if it has one) once its connection is in hand: after
    the wait for a pooled connection, the connect, a proxy's CONNECT and the TLS handshake; then
    aiohttp writes the request with no I/O awaited in between (a loop turn later on Python 3.11,
    whose tasks cannot start eagerly). A connection whose call does not go (or is cancelled while
    asked) goes back to the pool unused."""

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature, overridden
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        leaving = _LEAVING.get()
        if leaving is None:
            return connection
        _LEAVING.set(None)  # asked once per call
        try:
            go = await leaving()
        except BaseException:
            connection.release()
            raise
        if not go:
            connection.release()
            raise _Stopped
        return connection


def tls_context(ca_file: str) -> ssl.SSLContext | bool:
    """How Braze's certificates are checked: against the system's CAs (True), or `ca_file`'s."""
    if not ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CGW_UPSTREAM_CA_FILE cannot be read as PEM CAs: {exc}") from None


class _Target(NamedTuple):
    url: yarl.URL
    headers: Mapping[str, str]
    proxy: yarl.URL | None
    proxy_headers: Mapping[str, str] | None


class BrazeClient:
    """Sends trigger bodies for tenants over one shared, pooled session from `open_session`; with a
    `tracer`, each call in a client span (`tracing`), its `traceparent` sent only to tenants that
    opted in (`propagate_trace`)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout: aiohttp.ClientTimeout,
        egress: Egress | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._egress = egress or Egress()
        self._tracer = tracer
        self._targets: dict[tuple[str, str, str], _Target] = {}

    def _target(self, tenant: Tenant) -> _Target:
        """The tenant's parsed endpoint URL, headers and route, made once (parsing a URL on every
        call costs more than the rest of the request's setup)."""
        key = (tenant.braze_rest_url, tenant.braze_api_key, tenant.proxy)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) >= _MAX_TARGETS:  # reloads that change every key: start over
                self._targets.clear()
            url = yarl.URL(tenant.braze_rest_url + TRIGGER_PATH)
            route = self._egress.route(url, tenant.proxy)
            headers = {"Authorization": f"Bearer {tenant.braze_api_key}", "Content-Type": "application/json"}
            proxy_headers = route.proxy_headers()
            if proxy_headers and url.scheme == "http":  # forwarded, not tunnelled: the proxy reads it here
                headers.update(proxy_headers)
                proxy_headers = None
            target = self._targets[key] = _Target(url, headers, route.proxy, proxy_headers)
        return target

    async def trigger(
        self,
        tenant: Tenant,
        body: bytes,
        progress: Progress | None = None,
        time_left: float = math.inf,
        leaving: Leaving | None = None,
    ) -> Reply:
        """POST one batch body with the tenant's key; never raises for network failures.

        `time_left` (a caller's deadline) shortens the call's total timeout when it is sooner.
        `leaving` is asked once the connection is in hand, before anything is written (on a
        session not from `open_session`: before the call); when it says no, or the call fails
        before it said yes, the Reply is NOT_SENT."""
        if self._tracer is None:
            return await self._gated_post(tenant, body, progress, time_left, leaving)
        span = tracing.start_client_span(self._tracer, self._target(tenant)[0])
        reply = Reply(Delivery.UNKNOWN, failure="CancelledError")
        try:
            extra = tracing.propagation_headers(span) if tenant.propagate_trace else None
            reply = await self._gated_post(tenant, body, progress, time_left, leaving, extra)
            return reply
        finally:
            tracing.end_client_span(span, reply)

    async def _gated_post(
        self,
        tenant: Tenant,
        body: bytes,
        progress: Progress | None,
        time_left: float,
        leaving: Leaving | None,
        extra: Mapping[str, str] | None = None,
    ) -> Reply:
        """`_post`, with `leaving` asked where the session's connector can (`_LeavingConnector`)."""
        if leaving is None:
            return await self._post(tenant, body, progress, time_left, extra)
        if not isinstance(self._session.connector, _LeavingConnector):
            if not await leaving():
                return Reply(Delivery.NOT_SENT, failure=STOPPED)
            return await self._post(tenant, body, progress, time_left, extra)
        said = False

        async def asked() -> bool:
            nonlocal said
            said = await leaving()
            return said

        token = _LEAVING.set(asked)
        try:
            reply = await self._post(tenant, body, progress, time_left, extra)
        except _Stopped:
            return Reply(Delivery.NOT_SENT, failure=STOPPED)
        finally:
            _LEAVING.reset(token)
        if not said and reply.delivery is Delivery.UNKNOWN:  # it failed before a byte could leave
            return Reply(Delivery.NOT_SENT, failure=reply.failure)
        return reply

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
        url, headers, proxy, proxy_headers = self._target(tenant)
        if extra:
            headers = {**headers, **extra}
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                proxy=proxy,
                proxy_headers=proxy_headers,
                timeout=timeout,
                allow_redirects=False,
                trace_request_ctx=progress,
            ) as response:
                raw = await response.read()
                return _reply(response.status, response.headers, raw, tenant.braze_api_key, time.time())
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL) as exc:
            return Reply(Delivery.NOT_SENT, failure=type(exc).__name__)
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the CONNECT: no tunnel, nothing sent
            return Reply(Delivery.NOT_SENT, failure=f"the proxy answered {exc.status} to CONNECT")
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
