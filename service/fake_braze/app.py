"""The fake Braze server: an aiohttp application for `POST /canvas/trigger/send`.

A request goes through the checks in the order Braze's edge and API most plausibly apply
them (the order is not documented: docs/braze/CONTRACT.md section 8, point 26):

    routing (404, 405) -> latency -> fault (script or random) -> size (413)
    -> authentication (401) -> permission `canvas.trigger.send` (403) -> rate limit (429)
    -> content type, JSON, body rules (400) -> canvas lookup (400) -> 201

Routing and size belong to Braze's edge: they look at no key and use no budget. An injected
fault stands for a failing load balancer in front of Braze, so it acts before the size check.
Every error is Braze's JSON shape, `{"message": ...}`. Every request to the endpoint is
recorded as a `ReceivedCall`. The admin API (`/_fake/faults`, `/_fake/calls`) is in `admin`.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from canvas_gateway_server.braze import ARCHIVED_NOTICE, MAX_BODY_BYTES, PAUSED_NOTICE, TRIGGER_PATH

from . import admin, consumers, rules
from .consumers import OtherConsumer
from .faults import Action, FaultState
from .ratelimit import HOUR, RateLimiter
from .record import ReceivedCall

# Braze sends the rate-limit headers on a 401, but with empty values.
_UNKNOWN_LIMIT_HEADERS: Final = {
    "x-ratelimit-limit": "",
    "x-ratelimit-remaining": "",
    "x-ratelimit-reset": "",
}
_BEARER: Final = "Bearer "


@dataclass(frozen=True)
class FakeBrazeConfig:
    """Everything that shapes one fake Braze workspace. Validated on construction."""

    api_keys: frozenset[str]  # keys that authenticate; anything else gets 401
    keys_without_permission: frozenset[str] = frozenset()  # authenticate, lack canvas.trigger.send: 403
    canvases: frozenset[str] | None = None  # API-triggered canvases; None: any canvas id is one
    other_canvases: frozenset[str] = frozenset()  # exist but are not API-triggered: 400
    paused_canvases: frozenset[str] = frozenset()  # answered 201 with the paused notice
    archived_canvases: frozenset[str] = frozenset()  # answered 201 with the archived notice
    hourly_limit: int = 250_000  # recipient-targeted requests per key per clock hour
    hourly_window_seconds: int = HOUR  # that window's length: shorter only for benchmarks and tests
    broadcast_per_minute: int = 250  # broadcast requests per key per minute
    broadcast_per_minute_per_audience: int = 10  # per key, canvas_id and audience
    audience_calls_on_broadcast_budget: bool = True  # a call with `audience` and recipients draws on
    # the broadcast budgets, as the gateway's default `any_audience` reads it (CONTRACT.md 8, point 21:
    # Braze's pages disagree); False: only broadcasts do, the tenants' `broadcast_only`
    other_consumers: tuple[OtherConsumer, ...] = ()  # others spending the keys' pools (consumers.py)
    latency_seconds: float = 0.0  # added to every request to the trigger path
    error_rates: Mapping[int, float] = field(default_factory=dict)  # {503: 0.1}: 10% get 503
    reset_rate: float = 0.0  # share of requests whose connection is dropped
    seed: int | None = None  # seeds the random fault draws
    record: bool = True  # keep every ReceivedCall; turn off for long benchmarks
    clock: Callable[[], float] = time.time  # UTC epoch seconds; tests inject their own

    def __post_init__(self) -> None:
        names = [
            "api_keys",
            "keys_without_permission",
            "other_canvases",
            "paused_canvases",
            "archived_canvases",
        ]
        if self.canvases is not None:
            names.append("canvases")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a collection of strings, not a string")
            object.__setattr__(self, name, frozenset(value))
        if not self.api_keys or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must hold at least one non-empty string")
        if self.api_keys & self.keys_without_permission:
            raise ValueError("a key cannot both have and lack canvas.trigger.send")
        triggered = (self.canvases or frozenset()) | self.paused_canvases | self.archived_canvases
        if self.other_canvases & triggered:
            raise ValueError("a canvas cannot be both API-triggered and not API-triggered")
        for name in ("hourly_limit", "broadcast_per_minute", "broadcast_per_minute_per_audience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 1 <= self.hourly_window_seconds <= HOUR:
            raise ValueError("hourly_window_seconds must be from 1 to 3600")
        object.__setattr__(self, "other_consumers", consumers.check_unique(self.other_consumers))
        consumers.check_keys(self.other_consumers, self.api_keys)
        # FaultState validates rates and latency; build one to fail here, not at start.
        FaultState(random.Random(0), self.error_rates, self.reset_rate, self.latency_seconds)


class FakeBraze:
    """A fake Braze REST endpoint that validates, rate-limits, records and misbehaves on cue."""

    def __init__(self, config: FakeBrazeConfig) -> None:
        self.config = config
        self.calls: list[ReceivedCall] = []
        self.status_counts: Counter[int] = Counter()
        self.recipients_sent = 0  # recipients in 201 answers for active Canvases
        self.in_progress = 0  # trigger requests received and not yet answered
        self.arrived: list[bytes] = []
        """The raw body of every trigger request, as soon as it was read (before any latency or
        fault): what may have reached Braze, even if the caller never saw an answer."""
        self.faults = FaultState(
            random.Random(config.seed),
            config.error_rates,
            config.reset_rate,
            config.latency_seconds,
        )
        self.limiter = RateLimiter(
            config.clock,
            config.hourly_limit,
            config.broadcast_per_minute,
            config.broadcast_per_minute_per_audience,
            config.audience_calls_on_broadcast_budget,
            config.hourly_window_seconds,
            config.other_consumers,
        )
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """A new aiohttp application serving this fake, for embedding in another server."""
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
        app.router.add_post(TRIGGER_PATH, self._trigger)
        admin.add_routes(app, self)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> str:
        """Listen on `host:port` (0 picks a free port), over TLS with `tls`; return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the fake Braze is already running")
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=tls).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://[{host}]:{bound_port}" if ":" in host else f"{scheme}://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        """Close the listener and every connection. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def sent(self) -> list[ReceivedCall]:
        """Calls answered 201 for an active Canvas: the ones Braze would act on."""
        return [call for call in self.calls if call.status == 201 and call.notice is None]

    def clear(self) -> None:
        """Forget recorded calls and counters (not faults or rate-limit budgets)."""
        self.calls.clear()
        self.arrived.clear()
        self.status_counts.clear()
        self.recipients_sent = 0

    def set_consumers(self, others: tuple[OtherConsumer, ...]) -> None:
        """Replace the other consumers of the keys' pools; raises ConsumerError for a key the fake
        does not accept or two consumers on one key's pool."""
        consumers.check_keys(others, self.config.api_keys)
        self.limiter.set_consumers(consumers.check_unique(others))

    def spend(self, api_key: str, pool: str, calls: int) -> tuple[int, int]:
        """A burst by another consumer: `calls` on `api_key`'s `pool` now; (allowed, refused).
        Raises ConsumerError for a key the fake does not accept or an unknown pool."""
        consumers.check_keys([OtherConsumer(api_key, pool, share=1)], self.config.api_keys)
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
            raise consumers.ConsumerError("calls must be a whole number above 0")
        return self.limiter.spend(api_key, pool, calls)

    async def _trigger(self, request: web.Request) -> web.StreamResponse:
        self.in_progress += 1
        try:
            return await self._answer(request)
        finally:
            self.in_progress -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        received_at = self.config.clock()
        raw, size = await _read_body(request)
        self.arrived.append(raw)
        if self.faults.latency_seconds:
            await asyncio.sleep(self.faults.latency_seconds)
        fault = self.faults.next_fault()
        api_key, bearer = _presented_key(request.headers.get(hdrs.AUTHORIZATION))
        headers = tuple((k.lower(), v) for k, v in request.headers.items() if k.lower() != "authorization")
        body: Any = None
        too_large = rules.check_size(size)
        rejection: rules.Rejection | None = None
        if too_large is None:
            body, rejection = rules.parse_json(raw)
            rejection = rules.check_content_type(request.content_type) or rejection
        if fault is not None and fault.delay_seconds:
            await asyncio.sleep(fault.delay_seconds)

        if fault is not None and fault.action is Action.RESET:
            self._record(ReceivedCall(api_key, body, raw, 0, received_at, headers=headers))
            _drop_connection(request)
            return web.Response()  # never written: the connection is gone
        if fault is not None and fault.action is Action.STATUS:
            self._record(ReceivedCall(api_key, body, raw, fault.status_code, received_at, headers=headers))
            content_type = {hdrs.CONTENT_TYPE: fault.content_type}
            return web.Response(status=fault.status_code, body=fault.body, headers=content_type)

        reply = self._reply(api_key, bearer, body, too_large or rejection)
        call = ReceivedCall(
            api_key, body, raw, reply.status, received_at, reply.dispatch_id, reply.notice, headers
        )
        self._record(call)
        if reply.status == 201 and reply.notice is None:
            self.recipients_sent += len(body.get("recipients", ()))
        return _json(reply.status, reply.payload, reply.headers)

    def _reply(
        self, api_key: str | None, bearer: bool, body: Any, rejection: rules.Rejection | None
    ) -> _Reply:
        """Braze's answer once faults are out of the way; `rejection` is the pre-parse verdict."""
        config = self.config
        if rejection is not None and rejection[0] == 413:  # the edge refuses it: no key, no budget
            return _Reply(413, {"message": rejection[1]}, {})
        if not bearer or api_key not in config.api_keys | config.keys_without_permission:
            message = f"Invalid API key: {api_key or ''}"
            return _Reply(401, {"message": message}, _UNKNOWN_LIMIT_HEADERS)
        if api_key in config.keys_without_permission:
            # CONTRACT 4.2 names the text "Access Denied"; the exact body is not documented (point 27).
            # Its rate-limit headers are not recorded either: empty, as on a 401, since no budget is used.
            return _Reply(403, {"message": "Access Denied"}, _UNKNOWN_LIMIT_HEADERS)
        verdict = self.limiter.hit(api_key, body)
        headers = verdict.headers()
        if not verdict.allowed:
            return _Reply(429, {"message": "Rate Limited"}, headers)
        rejection = rejection or rules.check_request(body) or self._check_canvas(body["canvas_id"])
        if rejection is not None:
            return _Reply(rejection[0], {"message": rejection[1]}, headers)
        canvas_id = body["canvas_id"]
        notice = (
            ARCHIVED_NOTICE
            if canvas_id in self.config.archived_canvases
            else PAUSED_NOTICE
            if canvas_id in self.config.paused_canvases
            else None
        )
        dispatch_id = secrets.token_hex(16)
        payload = {"dispatch_id": dispatch_id, "message": "success"}
        if notice is not None:
            payload["notice"] = notice
        return _Reply(201, payload, headers, dispatch_id, notice)

    def _check_canvas(self, canvas_id: str) -> rules.Rejection | None:
        """An unknown or not API-triggered canvas. Braze's answer to these is not documented
        (CONTRACT 8, point 8): 400 with its JSON shape is the most plausible (point 27)."""
        config = self.config
        if canvas_id in config.other_canvases:
            return (400, f"Canvas {canvas_id} does not use API-triggered delivery")
        known = config.paused_canvases | config.archived_canvases
        if config.canvases is not None and canvas_id not in config.canvases | known:
            return (400, "canvas_id must be a string of the Canvas api identifier")
        return None

    def _record(self, call: ReceivedCall) -> None:
        self.status_counts[call.status] += 1
        if self.config.record:
            self.calls.append(call)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp answers an unknown path (404) or method (405) in plain text; Braze in JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json(
            exc.status,
            {"message": exc.reason},
            {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
        )


class _Reply(NamedTuple):
    status: int
    payload: dict[str, Any]
    headers: Mapping[str, str]
    dispatch_id: str | None = None
    notice: str | None = None


async def _read_body(request: web.Request) -> tuple[bytes, int]:
    """The body and its size; a body over Braze's limit is not kept (its size is over it)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return b"", max(request.content_length or 0, MAX_BODY_BYTES + 1)
    return raw, len(raw)


def _presented_key(authorization: str | None) -> tuple[str | None, bool]:
    """The key as Braze would echo it, and whether it came as `Bearer <key>`."""
    if authorization is None:
        return None, False
    if authorization.startswith(_BEARER):
        # A quoted key stays quoted, so it fails the lookup just as it does at Braze.
        return authorization[len(_BEARER) :], True
    return authorization, False


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def _drop_connection(request: web.Request) -> None:
    """Close the TCP connection at once, with an RST, so the client sees a reset."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
