"""What the fake records of each request it answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ReceivedCall:
    """One request to `/canvas/trigger/send`, as the fake saw and answered it."""

    api_key: str | None  # the key after "Bearer ", or None without one
    body: Any  # the parsed JSON, or None when it did not parse
    raw: bytes
    status: int  # what the fake answered; 0 when it dropped the connection
    received_at: float  # config.clock() when the request arrived
    dispatch_id: str | None = None  # set on 201
    notice: str | None = None  # set on 201 for a paused or archived Canvas
    headers: tuple[tuple[str, str], ...] = ()  # lowercased names, in order; Authorization left out

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        return next((v for k, v in self.headers if k == name.lower()), None)
