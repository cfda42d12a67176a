"""What one request carries down the send path: who sends, until when, under which key.

The gRPC edge builds one `RequestContext` per RPC, after authentication; `sending`, `dispatch`
(each batch, and a request's `FanOut`), `idempotency` and `reporting` take it (or its `scope`)
instead of the tenant, deadline and key one by one. Pure: no I/O, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tenants import Tenant


@dataclass(frozen=True, slots=True)
class IdempotencyScope:
    """Where a request's batches are claimed and their results kept: its tenant and its key.

    Keys are per tenant: two tenants using one key never share a batch."""

    tenant: str
    """The tenant's id."""
    key: str
    """The caller's SendOptions.idempotency_key, as given (not empty)."""

    def text(self) -> str:
        """The stores' form of the scope: "tenant/key", as in Redis keys and SQLite rows. A
        tenant id has no "/" (tenants.py), so the form names one scope; stores never parse it."""
        return f"{self.tenant}/{self.key}"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """One Send or SendStream, as the layers below the edge see it."""

    tenant: Tenant
    deadline: float | None = None
    """The caller's deadline on time.monotonic, less the margin its results need; None without."""
    scope: IdempotencyScope | None = None
    """The idempotency scope; None when the request has no key."""
    request_id: str = ""
    """The RPC's request id (`edge.observer`), returned in the summary."""
    validate_only: bool = False
    """Plan and validate, send nothing."""
    lane: str = ""
    """The budget lane the caller asked for (`SendOptions.priority`: `transactional`, `bulk`); "":
    the RPC's (unary Send transactional, SendStream bulk). A tenant whose lane the tenants file
    fixes keeps it (`limits.lane_of`)."""

    @classmethod
    def of(
        cls,
        tenant: Tenant,
        *,
        deadline: float | None = None,
        key: str | None = None,
        request_id: str = "",
        validate_only: bool = False,
        lane: str = "",
    ) -> RequestContext:
        """The context of a request by `tenant`; an empty or absent `key` means none."""
        scope = IdempotencyScope(tenant.id, key) if key else None
        return cls(tenant, deadline, scope, request_id, validate_only, lane)

    @property
    def key(self) -> str:
        """The idempotency key as the caller gave it; empty without one."""
        return self.scope.key if self.scope is not None else ""
