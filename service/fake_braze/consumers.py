"""Other consumers of a workspace's pools: the services beside the gateway (issue 19).

Braze's hourly pool and its per-key broadcast minute are shared by every caller holding the
workspace's key (CONTRACT.md section 5), not only by the gateway. An `OtherConsumer` stands for
them, on one key and one pool (`hourly`, or `broadcast`: the 250 a minute per key):

- `share`: the part of each window it takes the moment the window starts (rounded down to whole
  calls); set in the middle of a window, it takes that share of the current window at once;
- `per_second`: a steady rate after that, counted from the window's start or from the moment it
  was set, whichever is later.

Nothing runs in the background and nothing sleeps: `ratelimit.FixedWindow` works out from the
injected clock what a consumer has spent whenever its window is counted or shown, so the outcome
is the same however often anyone looks. A burst (N calls now) is `RateLimiter.spend`. Other
consumers are refused, like anyone, once a window is spent: what they wanted and did not get is
counted apart (`Tally.others_refused`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

POOLS: Final = ("hourly", "broadcast")
FIELDS: Final = frozenset({"api_key", "pool", "share", "per_second"})
_EPSILON: Final = 1e-9  # 0.29 * 100 is 28.999999999999996 in floating point: still 29 calls


class ConsumerError(ValueError):
    """A consumer or burst the fake cannot model; the message says why (no key in it)."""


@dataclass(frozen=True, slots=True)
class OtherConsumer:
    """A steady spender on one key's pool. Validated on construction."""

    api_key: str
    pool: str = "hourly"  # "hourly" or "broadcast"
    share: float = 0.0  # from 0 to 1: taken from each window as it starts
    per_second: float = 0.0  # calls a second, spread over the window

    def __post_init__(self) -> None:
        if not isinstance(self.api_key, str) or not self.api_key:
            raise ConsumerError("api_key must be a non-empty string")
        if self.pool not in POOLS:
            raise ConsumerError(f"pool must be one of {', '.join(POOLS)}")
        for name in ("share", "per_second"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConsumerError(f"{name} must be a number")
            if value < 0:
                raise ConsumerError(f"{name} must not be negative")
        if self.share > 1:
            raise ConsumerError("share must be from 0 to 1")
        if self.share == 0 and self.per_second == 0:
            raise ConsumerError("a consumer needs a share or a per_second rate above 0")

    def due(self, limit: int, elapsed: float) -> int:
        """The calls it has wanted, `elapsed` seconds into its time in a window of `limit` calls."""
        return math.floor(self.share * limit + _EPSILON) + math.floor(self.per_second * elapsed + _EPSILON)

    def to_json(self, api_key: str | None) -> dict[str, Any]:
        """The admin form, with `api_key` as the caller wants it shown."""
        return {"api_key": api_key, "pool": self.pool, "share": self.share, "per_second": self.per_second}


def from_json(data: Any) -> tuple[OtherConsumer, ...]:
    """Consumers from the admin API's `{"consumers": [...]}`; raises ConsumerError."""
    if not isinstance(data, dict) or set(data) != {"consumers"} or not isinstance(data["consumers"], list):
        raise ConsumerError('expected {"consumers": [{"api_key": ..., "share": ...}, ...]}')
    consumers = []
    for entry in data["consumers"]:
        if not isinstance(entry, dict):
            raise ConsumerError("each consumer must be an object")
        unknown = sorted(set(entry) - FIELDS)
        if unknown:
            raise ConsumerError(f"unknown consumer fields: {', '.join(unknown)}")
        if "api_key" not in entry:
            raise ConsumerError("a consumer needs an api_key")
        consumers.append(OtherConsumer(**entry))
    return check_unique(consumers)


def from_spec(text: str) -> OtherConsumer:
    """A consumer from the command line's `api_key=K,pool=hourly,share=0.3,per_second=2`."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name not in FIELDS or name in fields:
            raise ConsumerError(
                f"expected NAME=VALUE pairs, once each, from {', '.join(sorted(FIELDS))}; got {part!r}"
            )
        fields[name] = value
    if "api_key" not in fields:
        raise ConsumerError("a consumer needs an api_key")
    for name in ("share", "per_second"):
        if name in fields:
            try:
                fields[name] = float(fields[name])
            except ValueError:
                raise ConsumerError(f"{name} must be a number") from None
    return OtherConsumer(**fields)


def check_unique(consumers: Iterable[OtherConsumer]) -> tuple[OtherConsumer, ...]:
    """The consumers, refusing two on one key and pool (one consumer says it all)."""
    listed = tuple(consumers)
    seen: set[tuple[str, str]] = set()
    for consumer in listed:
        if (consumer.api_key, consumer.pool) in seen:
            raise ConsumerError(f"two consumers on one key's {consumer.pool} pool")
        seen.add((consumer.api_key, consumer.pool))
    return listed


def check_keys(consumers: Iterable[OtherConsumer], api_keys: frozenset[str]) -> None:
    """Refuse a consumer on a key the fake does not accept (its budgets are per accepted key)."""
    if any(consumer.api_key not in api_keys for consumer in consumers):
        raise ConsumerError("a consumer's api_key is not one of the fake's keys")
