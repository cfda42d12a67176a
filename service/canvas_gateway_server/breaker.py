"""A circuit breaker per Braze base URL, behind an interface so a shared one can follow.

When a Braze instance keeps failing (connections that do not open, timeouts, 5xx), calling it
harder only piles batches up and adds load to an outage. After `failures` consecutive failed
calls to one base URL the circuit opens: for `cooldown` seconds, batches for that URL end at
once NOT_ATTEMPTED / UNAVAILABLE (nothing sent, retryable). Then one probe call is let
through (half-open): an answer closes the circuit, a failure opens it again. Any HTTP answer
below 500, 4xx and 429 included, shows that Braze is up.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from .reply import Delivery, Reply

log = logging.getLogger(__name__)


class State(enum.IntEnum):
    """A circuit's state; the numbers are the state gauge's values."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


def healthy(reply: Reply) -> bool:
    """Whether a call shows the Braze instance working: any answer below 500."""
    return reply.delivery is Delivery.RESPONDED and reply.status < 500


def host_of(url: str) -> str:
    """The host of a base URL: what logs and metrics name a circuit by (never a secret)."""
    return urlsplit(url).netloc or url


class CircuitBreaker(Protocol):
    """What the dispatcher asks before and tells after each Braze call."""

    def blocked_until(self, url: str) -> float:
        """0 when a call to `url` may go now; else the epoch second when one may be tried."""
        ...

    def record(self, url: str, reply: Reply) -> None:
        """Learn from the outcome of a call to `url`."""
        ...


class NoBreaker:
    """Never blocks: the breaker turned off (CGW_BREAKER_FAILURES=0)."""

    def blocked_until(self, url: str) -> float:
        return 0.0

    def record(self, url: str, reply: Reply) -> None:
        pass


@dataclass(slots=True)
class _Circuit:
    state: State = State.CLOSED
    failures: int = 0
    until: float = 0.0
    """OPEN: when the cool-down ends. HALF_OPEN: when the probe under way counts as lost."""


class LocalBreaker:
    """In-process breaker: one circuit per base URL. `on_change(host, state)` is told of every
    state change (metrics)."""

    def __init__(
        self,
        failures: int,
        cooldown: float,
        on_change: Callable[[str, State], None] = lambda host, state: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._failures = failures
        self._cooldown = cooldown
        self._on_change = on_change
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def blocked_until(self, url: str) -> float:
        circuit = self._circuits.get(url)
        if circuit is None or circuit.state is State.CLOSED:
            return 0.0
        now = self._clock()
        if now < circuit.until:
            return circuit.until
        # Cool-down over (or the last probe never reported back): this call is the probe.
        self._set(url, circuit, State.HALF_OPEN)
        circuit.until = now + self._cooldown
        return 0.0

    def record(self, url: str, reply: Reply) -> None:
        circuit = self._circuits.setdefault(url, _Circuit())
        if healthy(reply):
            circuit.failures = 0
            if circuit.state is not State.CLOSED:
                self._set(url, circuit, State.CLOSED)
            return
        circuit.failures += 1
        if circuit.state is State.HALF_OPEN or (
            circuit.state is State.CLOSED and circuit.failures >= self._failures
        ):
            circuit.until = self._clock() + self._cooldown
            self._set(url, circuit, State.OPEN)

    def _set(self, url: str, circuit: _Circuit, state: State) -> None:
        circuit.state = state
        host = host_of(url)
        self._on_change(host, state)
        if state is State.OPEN:
            log.warning(
                "Braze at %s failed %d calls in a row: circuit open for %g s, its batches end NOT_ATTEMPTED",
                host,
                circuit.failures,
                self._cooldown,
                extra={"braze_host": host, "breaker_state": state.name},
            )
        else:
            log.info(
                "Braze at %s: circuit %s",
                host,
                state.name,
                extra={"braze_host": host, "breaker_state": state.name},
            )
