"""A fake Braze `POST /canvas/trigger/send` for tests, benchmarks and `make run`.

It answers as Braze would (CONTRACT.md), in this order (see `app`): 404 / 405
for an unknown path or method and 413 for large bodies (Braze's edge), 401 for
unknown keys, 403 for keys without `canvas.trigger.send`, 429 from real per-key
counters, 400 for any body Braze would refuse and for a canvas that is unknown
or not API-triggered, 201 with a `dispatch_id` otherwise; every error as
`{"message": ...}`.
It records every call and can be scripted to fail (`Fault`), from Python or over
its `/_fake/` admin API.

    fake = FakeBraze(FakeBrazeConfig(api_keys=frozenset({"key"})))
    base_url = await fake.start()  # http://127.0.0.1:<free port>
    fake.faults.script([Fault.status(503), Fault.reset()])
    ...
    await fake.stop()

Module map: `rules` (body rules, pure), `ratelimit` (counters, injected
clock), `consumers` (other services spending the same pools), `faults` (fault
state), `app` (the aiohttp server and its check order), `admin` (the `/_fake/`
API), `__main__` (CLI).
"""

from canvas_gateway_server.braze import ARCHIVED_NOTICE, PAUSED_NOTICE

from .app import FakeBraze, FakeBrazeConfig
from .consumers import ConsumerError, OtherConsumer
from .faults import Fault, FaultError
from .record import ReceivedCall

__all__ = [
    "ARCHIVED_NOTICE",
    "PAUSED_NOTICE",
    "ConsumerError",
    "FakeBraze",
    "FakeBrazeConfig",
    "Fault",
    "FaultError",
    "OtherConsumer",
    "ReceivedCall",
]
