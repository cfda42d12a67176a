"""SIGHUP (reload the tenants file) from the first line of `main`, not only once serving.

SIGHUP's default action ends a process, and a gateway takes a second or more to start (imports,
tenants, ports, workers), so a reload asked for during start-up used to kill it (issue 17).
`Hangups.catch()` is the first thing `main` does, before the heavy imports: SIGHUPs are counted
until the running gateway (or the supervisor) takes the signal over with `take_over`, which then
reloads once if any came during start-up.

Before `main` runs, Python itself starts (tens of milliseconds) with the default action still in
place. A worker's supervisor starts it with SIGHUP ignored, which covers that moment for workers:
a SIGHUP a worker ignores came before it read the tenants file, which it reads afresh anyway. In a
container the gateway is process 1, which the default action never ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Hangups:
    """SIGHUPs counted from `catch` until `take_over` hands the signal to an event loop."""

    def __init__(self) -> None:
        self.during_start = 0
        self._previous: Any = None

    @classmethod
    def catch(cls) -> Hangups:
        """Count SIGHUPs from now on (the main thread only, as every signal handler)."""
        hangups = cls()
        hangups._previous = signal.signal(signal.SIGHUP, hangups._count)
        return hangups

    def _count(self, _signal: int, _frame: FrameType | None) -> None:
        self.during_start += 1

    def take_over(self, loop: asyncio.AbstractEventLoop, reload: Callable[[], None]) -> None:
        """From now on SIGHUP calls `reload` on `loop`; if any came during start-up, reload once now."""
        loop.add_signal_handler(signal.SIGHUP, reload)
        if self.during_start:
            log.info(
                "SIGHUP during start-up (%d times): reloading once, now that start-up is over",
                self.during_start,
            )
            self.during_start = 0
            reload()

    def release(self) -> None:
        """Give SIGHUP back the handling it had before `catch` (for a `main` called in a test)."""
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
