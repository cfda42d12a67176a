"""Fault injection: a FIFO script of faults, random error rates and added latency.

Each request to the trigger endpoint takes at most one fault: the next scripted
one if the script is not empty, otherwise one drawn at random from the rates.
Faults act before Braze's own logic (auth, rate limits, validation), like a
failing load balancer would, so they use no rate-limit budget.

The admin API (`POST /_fake/faults`) accepts the JSON form read by
`FaultState.apply_json`; keys left out keep their setting, script entries append:

    {"script": [{"status": 503}, {"reset": true}, {"delay_ms": 2000},
                {"status": 502, "body": "<html>bad gateway</html>",
                 "content_type": "text/html"},
                {"delay_ms": 100, "status": 504}],
     "rates": {"500": 0.1, "reset": 0.05},
     "latency_ms": 20}
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson


class FaultError(ValueError):
    """A fault specification that cannot be applied (bad status, rate or shape)."""


class Action(enum.Enum):
    """What a fault does once its delay has passed."""

    PROCEED = "proceed"  # answer normally
    STATUS = "status"  # answer with a fixed status and body
    RESET = "reset"  # read the body, then drop the connection without a response


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault. Build it with the class methods."""

    action: Action
    delay_seconds: float = 0.0
    status_code: int = 0
    body: bytes = b""
    content_type: str = "application/json"

    @classmethod
    def status(cls, status: int, body: bytes | None = None, content_type: str = "application/json") -> Fault:
        """Answer `status`; the default body is `{"message": "<reason phrase>"}`."""
        return cls.delay_then_status(0.0, status, body, content_type)

    @classmethod
    def delay_then_status(
        cls,
        seconds: float,
        status: int,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Fault:
        """Wait `seconds`, then answer `status` with `body`."""
        if not 100 <= status <= 599:
            raise FaultError(f"status must be an HTTP status code, got {status}")
        _check_delay(seconds)
        if body is None:
            body = orjson.dumps({"message": _reason(status)})
        return cls(Action.STATUS, seconds, status, body, content_type)

    @classmethod
    def reset(cls, delay_seconds: float = 0.0) -> Fault:
        """Read the request body, optionally wait, then drop the connection."""
        _check_delay(delay_seconds)
        return cls(Action.RESET, delay_seconds)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait `seconds`, then answer normally."""
        _check_delay(seconds)
        return cls(Action.PROCEED, seconds)

    @classmethod
    def from_json(cls, spec: Any) -> Fault:
        """Parse one admin script entry such as `{"status": 503}` or `{"reset": true}`."""
        if not isinstance(spec, dict) or not spec.keys() <= _SCRIPT_KEYS:
            raise FaultError(f"a script entry is an object with keys among {sorted(_SCRIPT_KEYS)}")
        delay = _number(spec.get("delay_ms", 0), "delay_ms") / 1000
        if spec.get("reset", False) is True:
            if "status" in spec:
                raise FaultError("a script entry cannot both reset and answer a status")
            return cls.reset(delay)
        if "status" in spec:
            status, body = spec["status"], spec.get("body")
            if not isinstance(status, int) or isinstance(status, bool):
                raise FaultError("status must be an integer")
            if body is not None and not isinstance(body, str):
                raise FaultError("body must be a string")
            content_type = spec.get("content_type", "application/json")
            if not isinstance(content_type, str):
                raise FaultError("content_type must be a string")
            encoded = None if body is None else body.encode()
            return cls.delay_then_status(delay, status, encoded, content_type)
        if "delay_ms" not in spec:
            raise FaultError("a script entry needs status, reset or delay_ms")
        return cls.delay(delay)

    def to_json(self) -> dict[str, Any]:
        """The admin JSON form of this fault."""
        spec: dict[str, Any] = {"delay_ms": self.delay_seconds * 1000}
        if self.action is Action.RESET:
            spec["reset"] = True
        elif self.action is Action.STATUS:
            spec["status"] = self.status_code
            spec["body"] = self.body.decode(errors="replace")
            spec["content_type"] = self.content_type
        return spec


_SCRIPT_KEYS = frozenset({"status", "body", "content_type", "reset", "delay_ms"})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _check_delay(seconds: float) -> None:
    if not 0 <= seconds <= 3600:
        raise FaultError(f"delay must be between 0 and 3600 seconds, got {seconds}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{name} must be a number")
    return float(value)


class FaultState:
    """The live fault configuration of one fake: script, rates, latency and the RNG."""

    def __init__(
        self,
        rng: random.Random,
        error_rates: Mapping[int, float] | None = None,
        reset_rate: float = 0.0,
        latency_seconds: float = 0.0,
    ) -> None:
        self._rng = rng
        self._script: deque[Fault] = deque()
        self._rates: list[tuple[float, Fault]] = []
        self.latency_seconds = 0.0
        self.set_rates(error_rates or {}, reset_rate)
        self.set_latency(latency_seconds)

    def script(self, faults: Iterable[Fault]) -> None:
        """Append faults to the FIFO script; each request consumes one."""
        self._script.extend(faults)

    def set_rates(self, error_rates: Mapping[int, float], reset_rate: float = 0.0) -> None:
        """Replace the random rates: `{503: 0.1}` answers 10% of requests with 503."""
        self._rates = _build_rates(error_rates, reset_rate)

    def set_latency(self, seconds: float) -> None:
        """Add `seconds` of latency to every request."""
        _check_delay(seconds)
        self.latency_seconds = seconds

    def clear(self) -> None:
        """Remove every fault: script, rates and latency."""
        self._script.clear()
        self._rates = []
        self.latency_seconds = 0.0

    def next_fault(self) -> Fault | None:
        """The fault for the next request, or None to answer normally."""
        if self._script:
            return self._script.popleft()
        if not self._rates:
            return None
        draw = self._rng.random()
        for rate, fault in self._rates:
            if draw < rate:
                return fault
            draw -= rate
        return None

    def apply_json(self, data: Any) -> None:
        """Apply an admin request body; keys left out keep their current setting."""
        if not isinstance(data, dict) or not data.keys() <= {"script", "rates", "latency_ms"}:
            raise FaultError("expected an object with keys among script, rates, latency_ms")
        script = data.get("script", [])
        if not isinstance(script, list):
            raise FaultError("script must be an array")
        # Validate everything before changing anything, so a bad request changes nothing.
        faults = [Fault.from_json(spec) for spec in script]
        rates = _build_rates(*_parse_rates(data["rates"])) if "rates" in data else self._rates
        latency = self.latency_seconds
        if "latency_ms" in data:
            latency = _number(data["latency_ms"], "latency_ms") / 1000
            _check_delay(latency)
        self._rates = rates
        self.latency_seconds = latency
        self.script(faults)

    def to_json(self) -> dict[str, Any]:
        """The current state in the admin JSON form."""
        rates = {
            ("reset" if fault.action is Action.RESET else str(fault.status_code)): rate
            for rate, fault in self._rates
        }
        return {
            "script": [fault.to_json() for fault in self._script],
            "rates": rates,
            "latency_ms": self.latency_seconds * 1000,
        }


def _build_rates(error_rates: Mapping[int, float], reset_rate: float) -> list[tuple[float, Fault]]:
    rates = [(float(rate), Fault.status(status)) for status, rate in error_rates.items()]
    rates.append((float(reset_rate), Fault.reset()))
    if any(not 0 <= rate <= 1 for rate, _ in rates) or sum(rate for rate, _ in rates) > 1:
        raise FaultError("each rate must be in [0, 1] and together they must not exceed 1")
    return [(rate, fault) for rate, fault in rates if rate > 0]


def _parse_rates(rates: Any) -> tuple[dict[int, float], float]:
    if not isinstance(rates, dict):
        raise FaultError('rates must be an object like {"503": 0.1, "reset": 0.05}')
    errors: dict[int, float] = {}
    reset = 0.0
    for name, rate in rates.items():
        if name == "reset":
            reset = _number(rate, "rates.reset")
        elif name.isdigit() and 100 <= int(name) <= 599:
            errors[int(name)] = _number(rate, f"rates.{name}")
        else:
            raise FaultError(f"unknown rate {name!r}: use an HTTP status or 'reset'")
    return errors, reset
