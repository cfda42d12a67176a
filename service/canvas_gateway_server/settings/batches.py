"""The settings of a batch's path: the Braze client (`Upstream`), retries (`Retry`), how requests
become batches and results (`Sending`), and where budgets and kept results live (`State`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..egress import parse_proxy
from ..errors import ConfigError
from .spec import AT_LEAST_ONE, ENV_PREFIX, NOT_NEGATIVE, POSITIVE, check_bounds, check_redis_url, setting


@dataclass(frozen=True, slots=True)
class Upstream:
    """The pooled HTTP client to Braze."""

    pool_size: int = setting("upstream_pool_size", 100, AT_LEAST_ONE)
    """Most open HTTP connections to Braze (keep-alive pool, all tenants)."""
    connect_timeout_seconds: float = setting("upstream_connect_timeout_seconds", 5.0, POSITIVE)
    """Time to open a connection to Braze."""
    timeout_seconds: float = setting("upstream_timeout_seconds", 30.0, POSITIVE)
    """Time for one Braze call, from start to the end of the response body."""
    proxy: str = setting("upstream_proxy", "", secret=True)
    """HTTP(S) proxy to Braze for every tenant (http://[user:password@]host:port), `none` for no
    proxy; empty: the standard HTTPS_PROXY / HTTP_PROXY / NO_PROXY variables. Never logged."""
    no_proxy: str = setting("upstream_no_proxy", "")
    """Braze hosts reached without the proxy, in NO_PROXY's syntax (added to NO_PROXY's)."""
    ca_file: str = setting("upstream_ca_file", "")
    """PEM file of the CAs trusted for Braze's TLS, in place of the system's (such as a
    TLS-inspecting proxy's CA); empty: the system's."""

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.proxy:
            parse_proxy(self.proxy, f"{ENV_PREFIX}UPSTREAM_PROXY")


@dataclass(frozen=True, slots=True)
class Retry:
    """When a batch is called again, and when it is not called at all (budget, breaker)."""

    max_attempts: int = setting("max_attempts", 3, AT_LEAST_ONE)
    """Calls per batch, counting retries; only safe failures are retried."""
    base_delay_seconds: float = setting("retry_base_delay_seconds", 0.2, NOT_NEGATIVE)
    """First backoff after a connection that could not be opened; doubles each time."""
    max_wait_seconds: float = setting("max_retry_wait_seconds", 30.0, NOT_NEGATIVE)
    """Longest a batch waits for a rate-limit reset before giving up with RESOURCE_EXHAUSTED."""
    min_call_seconds: float = setting("min_call_seconds", 0.2, NOT_NEGATIVE)
    """Under a caller's deadline, a Braze call starts only with at least this long left."""
    budget_ratio: float = setting("retry_budget_ratio", 0.2, NOT_NEGATIVE)
    """A tenant's retries may be at most this share of its first calls over 10 s (plus the minimum)."""
    budget_minimum: int = setting("retry_budget_minimum", 10, NOT_NEGATIVE)
    """Retries a tenant may always make in 10 s, whatever its share; with the ratio, 0 and 0
    allow none."""
    breaker_failures: int = setting("breaker_failures", 5, NOT_NEGATIVE)
    """Consecutive failed calls (no connection, timeout, 5xx) to one Braze URL that open its
    circuit: its batches then end NOT_ATTEMPTED at once; 0 turns the breaker off."""
    breaker_cooldown_seconds: float = setting("breaker_cooldown_seconds", 10.0, NOT_NEGATIVE)
    """How long an open circuit stays open before one probe call may test Braze again."""

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, slots=True)
class Sending:
    """How a request's recipients become batches in flight and results back to the caller."""

    unary_max_recipients: int = setting("unary_max_recipients", 10_000, AT_LEAST_ONE)
    """Most recipients one Send may carry; SendStream has no cap."""
    request_concurrency: int = setting("request_concurrency", 8, AT_LEAST_ONE)
    """Batches of one request in flight at once."""
    tenant_concurrency: int = setting("tenant_concurrency", 32, AT_LEAST_ONE)
    """Batches of one tenant in flight at once, unless its tenants entry says otherwise."""
    result_queue_size: int = setting("result_queue_size", 64, AT_LEAST_ONE)
    """Results buffered per stream before batches wait for the caller to read."""
    reconcile_tail_results: int = setting("reconcile_tail_results", 2048, AT_LEAST_ONE)
    """Results a stream remembers after handing them to gRPC: if the stream is then cut off
    (caller gone, or shutdown past its grace), these are logged for reconciliation, since a
    caller that had stopped reading never saw them."""
    deadline_margin_seconds: float = setting("deadline_margin_seconds", 0.1, NOT_NEGATIVE)
    """Of a caller's deadline, the time kept back for its results to reach it."""

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, slots=True)
class State:
    """Where budgets and idempotency keys' results live, and for how long results are kept."""

    redis_url: str = setting("redis_url", "", secret=True)
    """Redis shared by every replica and worker: Braze budgets and idempotency keys' results
    (redis://[:password@]host:port/db; rediss:// for TLS). Empty: this process's own. Never logged."""
    redis_timeout_seconds: float = setting("redis_timeout_seconds", 0.25, POSITIVE)
    """Longest wait for one Redis operation before it counts as failed (see redis_failure)."""
    redis_failure: str = setting("redis_failure", "open")
    """While Redis does not answer, budgets `open`: each process keeps its own (a metric and a log
    line say so), or `closed`: batches end NOT_ATTEMPTED / UNAVAILABLE. Keys' results always
    fail closed."""
    idempotency_ttl_seconds: float = setting("idempotency_ttl_seconds", 86_400.0, POSITIVE)
    """How long a batch's kept result answers for its idempotency key."""
    idempotency_capacity: int = setting("idempotency_capacity", 50_000, AT_LEAST_ONE)
    """Batches the in-process store keeps (the oldest go first, the biggest tenant's first, never a
    claim in flight): about 30 MB at 0.6 KB a batch, within deploy/k8s' memory limit beside the
    gateway's own 60 MB. Only on port 0, without Redis or a file."""
    idempotency_file: str = setting("idempotency_file", "")
    """SQLite file in which the host's workers keep idempotency keys' results, across restarts
    (not used with Redis); empty: canvas-gateway-<gRPC port>/keys.sqlite3 in the temporary
    directory, or (on port 0) the supervisor's private folder, or with one process its memory."""
    idempotency_lease_seconds: float = setting("idempotency_lease_seconds", 900.0, POSITIVE)
    """The longest a claimed batch counts as in flight while its gateway runs; then it is UNKNOWN."""
    results_kept: bool = setting("results_kept", True)
    """Keep every batch's result (keyed or not) in the results store for the idempotency TTL, for
    GetResults and FindRecipient: positions and salted hashes of identifiers, never an identifier
    (`outcomes`). false: nothing is kept, and those RPCs answer NOT_FOUND."""

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.redis_failure not in ("open", "closed"):
            raise ConfigError(f"{ENV_PREFIX}REDIS_FAILURE must be open or closed")
        if self.redis_url:
            check_redis_url(self.redis_url)
