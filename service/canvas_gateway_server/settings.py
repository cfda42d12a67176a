"""All configuration in one frozen object, read once at boot, failing fast.

Every field has a default, an environment variable and a one-line meaning. Values come
from, in rising priority: the defaults, the TOML file named by CGW_CONFIG_FILE (keys are
the field names), then the environment. `from_env` takes the mapping as a parameter so
tests pass a dict.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

ENV_PREFIX = "CGW_"
RESERVED_FILES = 128
"""Open files a gateway process keeps beside its Braze pool when it derives its connection cap:
Redis, the admin port, log and tenants files, gRPC's and asyncio's own (about 50 measured idle)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Gateway settings. The env name of a field is CGW_ + its name in upper case."""

    grpc_address: str = "127.0.0.1:50051"
    """Where the gRPC server listens (host:port; port 0 picks a free one)."""
    admin_address: str = "127.0.0.1:8081"
    """Where the admin HTTP listener serves /metrics, /healthz and /readyz (host:port; port 0 picks one)."""
    metrics_enabled: bool = True
    """Count Prometheus metrics. Off, /metrics is empty: the benchmark's baseline, not for production."""
    tls_cert_file: str = ""
    """PEM certificate chain for TLS on the gRPC port; with tls_key_file. Unset: plaintext."""
    tls_key_file: str = ""
    """PEM private key for tls_cert_file."""
    tenants_file: str = ""
    """TOML file of tenants (see docs/configuration.md). Required unless demo is true."""
    demo: bool = False
    """Run against an embedded fake Braze with one demo tenant. Never in production."""
    demo_braze_port: int = 9700
    """Port of the embedded fake Braze in demo mode (on 127.0.0.1)."""
    unary_max_recipients: int = 10_000
    """Most recipients one Send may carry; SendStream has no cap."""
    request_concurrency: int = 8
    """Batches of one request in flight at once."""
    tenant_concurrency: int = 32
    """Batches of one tenant in flight at once, unless its tenants entry says otherwise."""
    upstream_pool_size: int = 100
    """Most open HTTP connections to Braze (keep-alive pool, all tenants)."""
    upstream_connect_timeout_seconds: float = 5.0
    """Time to open a connection to Braze."""
    upstream_timeout_seconds: float = 30.0
    """Time for one Braze call, from start to the end of the response body."""
    max_attempts: int = 3
    """Calls per batch, counting retries; only safe failures are retried."""
    retry_base_delay_seconds: float = 0.2
    """First backoff after a connection that could not be opened; doubles each time."""
    min_call_seconds: float = 0.2
    """Under a caller's deadline, a Braze call starts only with at least this long left."""
    deadline_margin_seconds: float = 0.1
    """Of a caller's deadline, the time kept back for its results to reach it."""
    retry_budget_ratio: float = 0.2
    """A tenant's retries may be at most this share of its first calls over 10 s (plus the minimum)."""
    retry_budget_minimum: int = 10
    """Retries a tenant may always make in 10 s, whatever its share; with the ratio, 0 and 0
    allow none."""
    breaker_failures: int = 5
    """Consecutive failed calls (no connection, timeout, 5xx) to one Braze URL that open its
    circuit: its batches then end NOT_ATTEMPTED at once; 0 turns the breaker off."""
    breaker_cooldown_seconds: float = 10.0
    """How long an open circuit stays open before one probe call may test Braze again."""
    max_retry_wait_seconds: float = 30.0
    """Longest a batch waits for a rate-limit reset before giving up with RESOURCE_EXHAUSTED."""
    result_queue_size: int = 64
    """Results buffered per stream before batches wait for the caller to read."""
    reconcile_tail_results: int = 2048
    """Results a stream remembers after handing them to gRPC: if the stream is then cut off
    (caller gone, or shutdown past its grace), these are logged for reconciliation, since a
    caller that had stopped reading never saw them."""
    stream_header_timeout_seconds: float = 10.0
    """Time a SendStream has to send its header; past it the stream ends DEADLINE_EXCEEDED."""
    stream_idle_timeout_seconds: float = 60.0
    """Time a SendStream may send nothing while none of its batches is in flight; past it the
    stream ends DEADLINE_EXCEEDED after the results of what it sent, saying where to resume."""
    max_streams: int = 1000
    """SendStreams this process holds open at once, all tenants; more are refused RESOURCE_EXHAUSTED."""
    max_streams_per_tenant: int = 100
    """SendStreams one tenant may hold open at once in this process; more are refused RESOURCE_EXHAUSTED."""
    request_message_timeout_seconds: float = 30.0
    """Time a unary call (Send, a health check) has to deliver its request message once started;
    past it the call ends DEADLINE_EXCEEDED, nothing done."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest gRPC message accepted or sent (one Send, or one stream chunk)."""
    keepalive_time_seconds: float = 60.0
    """Idle time after which the server pings a connection, to find dead peers."""
    keepalive_timeout_seconds: float = 20.0
    """Time a keepalive ping has to be answered before the connection is closed."""
    keepalive_min_client_interval_seconds: float = 10.0
    """Shortest interval between a client's keepalive pings the server tolerates."""
    handshake_timeout_seconds: float = 10.0
    """Time a new connection has to finish its handshake (TLS, then HTTP/2's preface and SETTINGS);
    past it the connection is closed."""
    max_connection_idle_seconds: float = 60.0
    """Time a connection may stay open with no call under way before it is closed (GOAWAY); 0: never."""
    max_connections: int = 0
    """Client connections the gRPC port holds at once; more are closed on arrival. 0: the open-file
    limit less what the gateway keeps for Braze (upstream_pool_size), Redis, the admin port and files."""
    max_streams_per_connection: int = 100
    """Calls (HTTP/2 streams) one connection may have open at once, counted until the gateway has
    let go of them, so streams opened and reset at once are refused past it too (rapid reset)."""
    max_connection_age_seconds: float = 300.0
    """Age at which a client connection is asked to reconnect (GOAWAY), so clients behind a
    balancer spread over new replicas; 0: never. Calls under way finish first."""
    max_connection_age_grace_seconds: float = 0.0
    """After a connection's max age, time its calls under way still get; 0: as long as they take."""
    shutdown_delay_seconds: float = 5.0
    """On SIGTERM, how long not-ready is announced (health, /readyz) before new requests are refused."""
    shutdown_grace_seconds: float = 25.0
    """Then, how long in-flight requests may finish before their batches are abandoned with results."""
    workers: int = 0
    """Worker processes serving the gRPC port (SO_REUSEPORT) behind one admin port; 0: one per
    core (CPU affinity, capped by a cgroup CPU quota). 1 runs a single process, as does the demo."""
    worker_index: int = -1
    """Set by the supervisor for each worker it starts (-1: not a worker). Not for operators."""
    worker_dir: str = ""
    """Set by the supervisor: its private folder (admin sockets, shared budgets). Not for operators."""
    redis_url: str = field(default="", repr=False)
    """Redis shared by every replica and worker: Braze budgets and idempotency keys' results
    (redis://[:password@]host:port/db; rediss:// for TLS). Empty: this process's own. Never logged."""
    redis_timeout_seconds: float = 0.25
    """Longest wait for one Redis operation before it counts as failed (see redis_failure)."""
    redis_failure: str = "open"
    """While Redis does not answer, budgets `open`: each process keeps its own (a metric and a log
    line say so), or `closed`: batches end NOT_ATTEMPTED / UNAVAILABLE. Keys' results always
    fail closed."""
    idempotency_ttl_seconds: float = 86_400.0
    """How long a batch's kept result answers for its idempotency key."""
    idempotency_capacity: int = 50_000
    """Batches the in-process store keeps (the oldest go first, the biggest tenant's first, never a
    claim in flight): about 30 MB at 0.6 KB a batch. Only on port 0, without Redis or a file."""
    idempotency_file: str = ""
    """SQLite file in which the host's workers keep idempotency keys' results, across restarts
    (not used with Redis); empty: canvas-gateway-<gRPC port>/keys.sqlite3 in the temporary
    directory, or (on port 0) the supervisor's private folder, or with one process its memory."""
    idempotency_lease_seconds: float = 900.0
    """The longest a claimed batch counts as in flight while its gateway runs; then it is UNKNOWN."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: str = "text"
    """`text` (one line a record) or `json` (one JSON object a line)."""

    def __post_init__(self) -> None:
        positive = (
            "unary_max_recipients",
            "request_concurrency",
            "tenant_concurrency",
            "upstream_pool_size",
            "max_attempts",
            "result_queue_size",
            "reconcile_tail_results",
            "max_message_bytes",
            "idempotency_capacity",
            "max_streams",
            "max_streams_per_tenant",
            "max_streams_per_connection",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be at least 1")
        for name in (
            "upstream_connect_timeout_seconds",
            "upstream_timeout_seconds",
            "stream_header_timeout_seconds",
            "stream_idle_timeout_seconds",
            "request_message_timeout_seconds",
            "handshake_timeout_seconds",
            "keepalive_time_seconds",
            "keepalive_timeout_seconds",
            "keepalive_min_client_interval_seconds",
            "redis_timeout_seconds",
            "idempotency_ttl_seconds",
            "idempotency_lease_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be positive")
        for name in (
            "retry_base_delay_seconds",
            "max_retry_wait_seconds",
            "min_call_seconds",
            "deadline_margin_seconds",
            "breaker_failures",
            "retry_budget_ratio",
            "retry_budget_minimum",
            "breaker_cooldown_seconds",
            "shutdown_delay_seconds",
            "shutdown_grace_seconds",
            "max_connection_age_seconds",
            "max_connection_age_grace_seconds",
            "max_connection_idle_seconds",
            "max_connections",
            "workers",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must not be negative")
        if not 0 <= self.demo_braze_port <= 65535:
            raise ConfigError(f"{ENV_PREFIX}DEMO_BRAZE_PORT must be a port number")
        for name, example in (("grpc_address", "127.0.0.1:50051"), ("admin_address", "127.0.0.1:8081")):
            host, _, port = getattr(self, name).rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be host:port, such as {example}")
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if self.redis_failure not in ("open", "closed"):
            raise ConfigError(f"{ENV_PREFIX}REDIS_FAILURE must be open or closed")
        if self.redis_url:
            _check_redis_url(self.redis_url)
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"{ENV_PREFIX}LOG_FORMAT must be text or json")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(f"set both {ENV_PREFIX}TLS_CERT_FILE and {ENV_PREFIX}TLS_KEY_FILE, or neither")
        if self.demo and self.tenants_file:
            raise ConfigError(
                f"{ENV_PREFIX}DEMO and {ENV_PREFIX}TENANTS_FILE are both set: demo mode would replace the "
                "tenants with the public demo token and a fake Braze; unset one of them"
            )
        if self.is_worker and not self.worker_dir:
            raise ConfigError(
                f"{ENV_PREFIX}WORKER_INDEX is set by the supervisor, with {ENV_PREFIX}WORKER_DIR"
            )
        if not self.demo and not self.tenants_file:
            raise ConfigError(f"set {ENV_PREFIX}TENANTS_FILE, or {ENV_PREFIX}DEMO=true for the demo")

    @property
    def admin_host_port(self) -> tuple[str, int]:
        """CGW_ADMIN_ADDRESS split for listening: an IPv6 host loses its brackets."""
        host, _, port = self.admin_address.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def is_worker(self) -> bool:
        """Started by a supervisor, as one of several workers sharing the port."""
        return self.worker_index >= 0

    def grpc_options(self, open_files: int | None = None) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments: message sizes, keepalive, connection limits.

        `open_files` is the process's open-file limit (None: unlimited), from which the
        connection cap is derived when max_connections is 0."""

        def ms(seconds: float) -> int:
            return round(seconds * 1000)

        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # A second gateway on a bound port must fail, unless it is a worker of the same set.
            ("grpc.so_reuseport", 1 if self.is_worker else 0),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_seconds)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_seconds)),
            # Since grpc/grpc#34647 gRPC core waits for any ping's answer for ping_timeout_ms
            # (60 s by default) whatever keepalive_timeout_ms says: a frozen peer was dropped
            # after 64 s with a 2 s keepalive timeout.
            ("grpc.http2.ping_timeout_ms", ms(self.keepalive_timeout_seconds)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.keepalive_min_client_interval_seconds)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout_seconds)),
            # With gRPC core's overload protection (on by default), a stream counts against this
            # until the server has released it, not only until the peer resets it.
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
        ]
        if self.max_connection_idle_seconds:
            options.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle_seconds)))
        connections = self.connection_cap(open_files)
        if connections is not None:
            options.append(("grpc.max_allowed_incoming_connections", connections))
        if self.max_connection_age_seconds:
            options.append(("grpc.max_connection_age_ms", ms(self.max_connection_age_seconds)))
            if self.max_connection_age_grace_seconds:
                options.append(
                    ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_seconds))
                )
        return options

    def connection_cap(self, open_files: int | None) -> int | None:
        """Most client connections on the gRPC port: max_connections, else what the open-file
        limit leaves after the gateway's own files (None: no limit)."""
        if self.max_connections:
            return self.max_connections
        if open_files is None:
            return None
        cap = open_files - self.upstream_pool_size - RESERVED_FILES
        if cap < 1:
            raise ConfigError(
                f"the open-file limit ({open_files}) leaves no connections for the gRPC port once "
                f"{self.upstream_pool_size} (CGW_UPSTREAM_POOL_SIZE) and {RESERVED_FILES} are kept for "
                f"Braze and the gateway's own files: raise it (ulimit -n) or set {ENV_PREFIX}MAX_CONNECTIONS"
            )
        return cap

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from CGW_CONFIG_FILE, then CGW_* variables, then `overrides`."""
        raw: dict[str, Any] = {}
        config_file = environ.get(f"{ENV_PREFIX}CONFIG_FILE")
        if config_file:
            raw.update(_read_toml(Path(config_file)))
        for spec in fields(cls):
            value = environ.get(ENV_PREFIX + spec.name.upper())
            if value is not None:
                raw[spec.name] = value
        names = {ENV_PREFIX + spec.name.upper() for spec in fields(cls)} | {f"{ENV_PREFIX}CONFIG_FILE"}
        mistyped = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in names)
        if mistyped:
            raise ConfigError(f"unknown settings in the environment: {', '.join(mistyped)}")
        raw.update(overrides)
        known = {spec.name: spec for spec in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        kwargs = {name: _coerce(name, value, type(known[name].default)) for name, value in raw.items()}
        return cls(**kwargs)


def _check_redis_url(url: str) -> None:
    """Refuse a Redis URL that would not parse as meant, in words that never quote it: it may
    hold a password, and a password with an unescaped `/`, `?` or `#` ends the host part early,
    so that its pieces would be read as a port, a database or a query."""
    name = f"{ENV_PREFIX}REDIS_URL"
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{name} must start with redis://, rediss:// or unix://")
    rest = url.split("://", 1)[1]
    host_end = min((at for at in map(rest.find, "/?#") if at >= 0), default=len(rest))
    if "@" in rest[host_end:]:
        raise ConfigError(
            f"{name} is not a valid URL: its password (or user name) holds an unescaped '/', '?' or "
            "'#'; percent-encode them (%2F, %3F, %23; an '@' as %40)"
        )
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: its port is not a number from 0 to 65535") from None
    if parts.scheme != "unix" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(f"{name} is not a valid URL: its path must be a database number, such as /0")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def _coerce(name: str, value: Any, kind: type) -> Any:
    if not isinstance(value, str) or kind is str:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind):
            raise ConfigError(f"setting {name} must be a {kind.__name__}")
        return value
    try:
        if kind is bool:
            lowered = value.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(value)
            return lowered in {"1", "true", "yes", "on"}
        return kind(value)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be a {kind.__name__}") from None
