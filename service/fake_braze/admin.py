"""The fake's admin API under `/_fake/`, on the same server as the trigger endpoint.

Only what docs/fake-braze.md documents, for tests and for scripting faults by hand (see `faults.py`
for the fault format):

    POST /_fake/faults      add script entries and/or replace rates and latency
    GET /_fake/faults       the current fault state
    DELETE /_fake/faults    remove every fault, rate and latency
    GET /_fake/calls        recorded calls, API keys reduced to a fingerprint
    DELETE /_fake/calls     forget recorded calls and counters
    PUT /_fake/consumers    replace the other consumers of the keys' pools (see `consumers.py`)
    GET /_fake/consumers    the other consumers, API keys reduced to a fingerprint
    DELETE /_fake/consumers stop every other consumer
    POST /_fake/burst       another consumer spends N calls of a key's pool now
    GET /_fake/budget       each kept window: its limit, what requests and others spent
    DELETE /_fake/budget    forget every rate-limit count and kept window

Other methods get 405 from aiohttp's router, which the app's middleware turns into Braze's
JSON error shape like every other error.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import orjson
from aiohttp import web

from . import consumers
from .consumers import ConsumerError, OtherConsumer
from .faults import FaultError, FaultState
from .ratelimit import RateLimiter, WindowView
from .record import ReceivedCall


class Recorder(Protocol):
    """What the admin API reads and resets of the fake (`app.FakeBraze`)."""

    faults: FaultState
    calls: list[ReceivedCall]
    limiter: RateLimiter

    def clear(self) -> None: ...

    def set_consumers(self, others: tuple[OtherConsumer, ...]) -> None: ...

    def spend(self, api_key: str, pool: str, calls: int) -> tuple[int, int]: ...


def add_routes(app: web.Application, fake: Recorder) -> None:
    """Serve `fake`'s admin API on `app`."""

    async def show_faults(_: web.Request) -> web.Response:
        return _json(200, fake.faults.to_json())

    async def add_faults(request: web.Request) -> web.Response:
        try:
            fake.faults.apply_json(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, FaultError) as exc:
            return _json(400, {"message": str(exc)})
        return await show_faults(request)

    async def clear_faults(request: web.Request) -> web.Response:
        fake.faults.clear()
        return await show_faults(request)

    async def show_calls(_: web.Request) -> web.Response:
        return _json(200, {"calls": [call_to_json(call) for call in fake.calls]})

    async def clear_calls(_: web.Request) -> web.Response:
        cleared = len(fake.calls)
        fake.clear()
        return _json(200, {"cleared": cleared})

    async def show_consumers(_: web.Request) -> web.Response:
        shown = [consumer.to_json(fingerprint(consumer.api_key)) for consumer in fake.limiter.consumers]
        return _json(200, {"consumers": shown})

    async def set_consumers(request: web.Request) -> web.Response:
        try:
            fake.set_consumers(consumers.from_json(orjson.loads(await request.read())))
        except (orjson.JSONDecodeError, ConsumerError) as exc:
            return _json(400, {"message": str(exc)})
        return await show_consumers(request)

    async def clear_consumers(request: web.Request) -> web.Response:
        fake.set_consumers(())
        return await show_consumers(request)

    async def burst(request: web.Request) -> web.Response:
        try:
            spec = orjson.loads(await request.read())
            if not isinstance(spec, dict) or not {"api_key", "calls"} <= set(spec) <= _BURST_FIELDS:
                raise ConsumerError('expected {"api_key": ..., "calls": N} and optionally "pool"')
            allowed, refused = fake.spend(spec["api_key"], spec.get("pool", "hourly"), spec["calls"])
        except (orjson.JSONDecodeError, ConsumerError) as exc:
            return _json(400, {"message": str(exc)})
        return _json(200, {"spent": allowed, "refused": refused})

    async def show_budget(_: web.Request) -> web.Response:
        return _json(200, {"windows": [window_to_json(pool, view) for pool, view in fake.limiter.budget()]})

    async def clear_budget(request: web.Request) -> web.Response:
        fake.limiter.reset()
        return await show_budget(request)

    app.router.add_post("/_fake/faults", add_faults)
    app.router.add_get("/_fake/faults", show_faults)
    app.router.add_delete("/_fake/faults", clear_faults)
    app.router.add_get("/_fake/calls", show_calls)
    app.router.add_delete("/_fake/calls", clear_calls)
    app.router.add_put("/_fake/consumers", set_consumers)
    app.router.add_get("/_fake/consumers", show_consumers)
    app.router.add_delete("/_fake/consumers", clear_consumers)
    app.router.add_post("/_fake/burst", burst)
    app.router.add_get("/_fake/budget", show_budget)
    app.router.add_delete("/_fake/budget", clear_budget)


_BURST_FIELDS = frozenset({"api_key", "pool", "calls"})


def window_to_json(pool: str, view: WindowView) -> dict[str, Any]:
    """The admin JSON form of one key's window; `requests + others <= limit` always holds."""
    tally = view.tally
    return {
        "pool": pool,
        "api_key": fingerprint(view.key),
        "start": view.start,
        "reset": view.end,
        "open": view.open,
        "limit": view.limit,
        "remaining": view.limit - tally.spent,
        "requests": tally.requests,
        "requests_refused": tally.requests_refused,
        "others": tally.others,
        "others_refused": tally.others_refused,
    }


def call_to_json(call: ReceivedCall) -> dict[str, Any]:
    """The admin JSON form of a recorded call; the API key is reduced to a fingerprint."""
    data: dict[str, Any] = {
        "api_key": fingerprint(call.api_key),
        "status": call.status,
        "received_at": call.received_at,
        "body": call.body,
        "raw_bytes": len(call.raw),
        "dispatch_id": call.dispatch_id,
        "notice": call.notice,
    }
    if call.body is None:
        data["raw"] = call.raw.decode(errors="replace")
    return data


def fingerprint(api_key: str | None) -> str | None:
    """A short, stable, non-reversible stand-in for an API key."""
    if api_key is None:
        return None
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def _json(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")
