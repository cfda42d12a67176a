"""The gateway's exceptions, one tree.

    GatewayError             expected failures a caller can act on
    +-- InvalidRequest       input breaks Braze's contract; carries violations -> INVALID_ARGUMENT
    +-- Unauthenticated      missing or unknown bearer token                   -> UNAUTHENTICATED
    +-- PermissionDenied     the tenant may not do this (e.g. broadcast)        -> PERMISSION_DENIED
    +-- ShuttingDown         the gateway is draining; the caller should resume  -> UNAVAILABLE
    +-- HeaderTimeout        a stream sent no header in time                    -> DEADLINE_EXCEEDED
    +-- StreamIdle           a stream sent nothing for too long; where to resume -> DEADLINE_EXCEEDED
    +-- TooManyStreams       the tenant, or the gateway, has the most streams open -> RESOURCE_EXHAUSTED
    +-- NotKept              no result is kept for the request asked about      -> NOT_FOUND
    +-- ResultsUnavailable   the results store did not answer a lookup          -> UNAVAILABLE
    +-- NotAcknowledged      a Replay without acknowledge_duplicates: nothing sent -> FAILED_PRECONDITION
    ConfigError              settings or tenants file invalid (boot or reload)
    StoreUnavailable         a state store (Redis, the host's file) did not answer in time
    StoreLost                a shared store lost what it kept; keys refused until acknowledged

The two store errors never end an RPC by themselves: the dispatcher turns them into a batch's
result (NOT_ATTEMPTED / UNAVAILABLE, or refused keys), the store's backlog offers again what
was not taken.

Upstream failures are not exceptions: each becomes a BatchResult (see results.py).
Anything else that escapes is a bug: it is logged and answered with INTERNAL and the text
"internal error", nothing more.
Texts never contain a secret.
"""

from __future__ import annotations

from collections.abc import Sequence

from .model import Violation


class GatewayError(Exception):
    """An expected failure of a whole RPC, mapped to a gRPC status in `status`."""


class InvalidRequest(GatewayError):
    """The request breaks Braze's contract; nothing was sent."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        first = self.violations[0] if self.violations else None
        summary = f"{first.field}: {first.description}" if first else "invalid request"
        more = len(self.violations) - 1
        super().__init__(summary + (f" (and {more} more)" if more > 0 else ""))


class Unauthenticated(GatewayError):
    """No bearer token, or one that no tenant owns."""


class PermissionDenied(GatewayError):
    """The tenant is known but may not make this request."""


class ShuttingDown(GatewayError):
    """The gateway is draining. For a stream it stopped reading, `resume_position` is the first
    position it did not read: every earlier one has a result."""

    def __init__(self, message: str, resume_position: int | None = None) -> None:
        super().__init__(message)
        self.resume_position = resume_position


class HeaderTimeout(GatewayError):
    """A stream sent no header within the configured time; nothing was sent."""


class StreamIdle(GatewayError):
    """A stream sent no message for the idle timeout while none of its batches was in flight.
    Like ShuttingDown, `resume_position` is the first position not read."""

    def __init__(self, message: str, resume_position: int) -> None:
        super().__init__(message)
        self.resume_position = resume_position


class TooManyStreams(GatewayError):
    """The tenant, or the whole gateway, already holds as many streams open as it may; nothing was sent."""


class NotKept(GatewayError):
    """GetResults or FindRecipient: nothing is kept of that request for this tenant."""


class ResultsUnavailable(GatewayError):
    """GetResults or FindRecipient: the results store did not answer; ask again."""


class NotAcknowledged(GatewayError):
    """Replay: the caller did not acknowledge that a recipient may get the Canvas twice."""


class ConfigError(Exception):
    """Settings or the tenants file are invalid. Raised at boot and on reload."""


class StoreUnavailable(Exception):
    """A shared store did not answer in time (the message names the store, never its URL)."""


class StoreLost(Exception):
    """The store no longer holds what it kept (Redis restarted without its data): a repeat could
    send again what was sent, so keys are refused until an operator acknowledges it. The text
    names the reason and the remedy, never the store's address."""
