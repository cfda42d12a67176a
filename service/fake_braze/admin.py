"""The fake's admin API under `/_fake/`, on the same server as the trigger endpoint.

Only what docs/fake-braze.md documents, for tests and for scripting faults by hand (see `faults.py`
for the fault format):

    POST /_fake/faults      add script entries and/or replace rates and latency
    GET /_fake/faults       the current fault state
    DELETE /_fake/faults    remove every fault, rate and latency
    GET /_fake/calls        recorded calls, API keys reduced to a fingerprint
    DELETE /_fake/calls     forget recorded calls and counters

Other methods get 405 from aiohttp's router, which the app's middleware turns into Braze's
JSON error shape like every other error.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import orjson
from aiohttp import web

from .faults import FaultError, FaultState
from .record import ReceivedCall


class Recorder(Protocol):
    """What the admin API reads and resets of the fake (`app.FakeBraze`)."""

    faults: FaultState
    calls: list[ReceivedCall]

    def clear(self) -> None: ...


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

    app.router.add_post("/_fake/faults", add_faults)
    app.router.add_get("/_fake/faults", show_faults)
    app.router.add_delete("/_fake/faults", clear_faults)
    app.router.add_get("/_fake/calls", show_calls)
    app.router.add_delete("/_fake/calls", clear_calls)


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
