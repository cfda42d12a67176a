"""All configuration in one frozen object of a few frozen groups, read once at boot, failing fast.

Each group (`Listen`, `Tenants`, `Telemetry`, `Workers`, `Upstream`, `Retry`, `Sending`, `Grpc`,
`Calls`, `State`, `Shutdown`) owns its fields' defaults, meanings and checks, the way httpx has
`Timeout` and `Limits`; a consumer reads `settings.<group>.<field>`. Every field also has one
flat name, given where it is declared (`setting("upstream_pool_size", 100)`): its environment
variable is CGW_ + that name in upper case and its key in the TOML file is that name, so the
operator's names do not depend on the grouping. `SETTINGS` is the table of them, derived from
the dataclasses. Values come from, in rising priority: the defaults, the TOML file named by
CGW_CONFIG_FILE, the environment, then `from_env`'s keyword overrides (flat names too).

`WorkerRole` (CGW_WORKER_INDEX, CGW_WORKER_DIR) is not a setting: the supervisor sets it for each
worker it starts; `from_env` only lets those two names through.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, get_type_hints
from urllib.parse import urlsplit

from .errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "CGW_"
CONFIG_FILE_ENV: Final = f"{ENV_PREFIX}CONFIG_FILE"
WORKER_INDEX_ENV: Final = f"{ENV_PREFIX}WORKER_INDEX"
WORKER_DIR_ENV: Final = f"{ENV_PREFIX}WORKER_DIR"
RESERVED_FILES = 128
"""Open files a gateway process keeps beside its Braze pool when it derives its connection cap:
Redis, the admin port, log and tenants files, gRPC's and asyncio's own (about 50 measured idle)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Bound:
    """A lower bound a number setting is checked against, with the words of its error."""

    holds: Callable[[float], bool]
    words: str


AT_LEAST_ONE: Final = Bound(lambda value: value >= 1, "must be at least 1")
POSITIVE: Final = Bound(lambda value: value > 0, "must be positive")
NOT_NEGATIVE: Final = Bound(lambda value: value >= 0, "must not be negative")


def setting(name: str, default: T, bound: Bound | None = None, *, secret: bool = False) -> T:
    """A field of a settings group: its flat `name` (env CGW_NAME, TOML key `name`), its default,
    and the bound it is checked against; a `secret` one is left out of the group's repr."""
    return field(default=default, repr=not secret, metadata={"name": name, "bound": bound})


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _check_bounds(group: DataclassInstance) -> None:
    for spec in fields(group):
        bound: Bound | None = spec.metadata["bound"]
        if bound is not None and not bound.holds(getattr(group, spec.name)):
            raise ConfigError(f"{env_name(spec.metadata['name'])} {bound.words}")


def _check_address(name: str, address: str, example: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{env_name(name)} must be host:port, such as {example}")


@dataclass(frozen=True, slots=True)
class Listen:
    """Where the gateway listens, and how the gRPC port is secured."""

    grpc_address: str = setting("grpc_address", "127.0.0.1:50051")
    """Where the gRPC server listens (host:port; port 0 picks a free one)."""
    admin_address: str = setting("admin_address", "127.0.0.1:8081")
    """Where the admin HTTP listener serves /metrics, /healthz and /readyz (host:port; port 0 picks one)."""
    tls_cert_file: str = setting("tls_cert_file", "")
    """PEM certificate chain for TLS on the gRPC port; with tls_key_file. Unset: plaintext."""
    tls_key_file: str = setting("tls_key_file", "")
    """PEM private key for tls_cert_file."""

    def __post_init__(self) -> None:
        _check_address("grpc_address", self.grpc_address, "127.0.0.1:50051")
        _check_address("admin_address", self.admin_address, "127.0.0.1:8081")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(f"set both {ENV_PREFIX}TLS_CERT_FILE and {ENV_PREFIX}TLS_KEY_FILE, or neither")

    @property
    def admin_host_port(self) -> tuple[str, int]:
        """CGW_ADMIN_ADDRESS split for listening: an IPv6 host loses its brackets."""
        host, _, port = self.admin_address.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def grpc_port(self) -> int:
        """The port of CGW_GRPC_ADDRESS (0: any free one)."""
        return int(self.grpc_address.rpartition(":")[2])


@dataclass(frozen=True, slots=True)
class Tenants:
    """Whom the gateway serves: the tenants file, or the demo's one tenant."""

    file: str = setting("tenants_file", "")
    """TOML file of tenants (see docs/configuration.md). Required unless demo is true."""
    demo: bool = setting("demo", False)
    """Run against an embedded fake Braze with one demo tenant. Never in production."""
    demo_braze_port: int = setting("demo_braze_port", 9700)
    """Port of the embedded fake Braze in demo mode (on 127.0.0.1)."""

    def __post_init__(self) -> None:
        if not 0 <= self.demo_braze_port <= 65535:
            raise ConfigError(f"{ENV_PREFIX}DEMO_BRAZE_PORT must be a port number")
        if self.demo and self.file:
            raise ConfigError(
                f"{ENV_PREFIX}DEMO and {ENV_PREFIX}TENANTS_FILE are both set: demo mode would replace the "
                "tenants with the public demo token and a fake Braze; unset one of them"
            )
        if not self.demo and not self.file:
            raise ConfigError(f"set {ENV_PREFIX}TENANTS_FILE, or {ENV_PREFIX}DEMO=true for the demo")


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What the gateway says about itself: logs and metrics."""

    log_level: str = setting("log_level", "INFO")
    """Python logging level."""
    log_format: str = setting("log_format", "text")
    """`text` (one line a record) or `json` (one JSON object a line)."""
    metrics_enabled: bool = setting("metrics_enabled", True)
    """Count Prometheus metrics. Off, /metrics is empty: the benchmark's baseline, not for production."""

    def __post_init__(self) -> None:
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"{ENV_PREFIX}LOG_FORMAT must be text or json")


@dataclass(frozen=True, slots=True)
class Workers:
    """How many processes serve the gRPC port."""

    count: int = setting("workers", 0, NOT_NEGATIVE)
    """Worker processes serving the gRPC port (SO_REUSEPORT) behind one admin port; 0: one per
    core (CPU affinity, capped by a cgroup CPU quota). 1 runs a single process, as does the demo."""

    def __post_init__(self) -> None:
        _check_bounds(self)


@dataclass(frozen=True, slots=True)
class Upstream:
    """The pooled HTTP client to Braze."""

    pool_size: int = setting("upstream_pool_size", 100, AT_LEAST_ONE)
    """Most open HTTP connections to Braze (keep-alive pool, all tenants)."""
    connect_timeout_seconds: float = setting("upstream_connect_timeout_seconds", 5.0, POSITIVE)
    """Time to open a connection to Braze."""
    timeout_seconds: float = setting("upstream_timeout_seconds", 30.0, POSITIVE)
    """Time for one Braze call, from start to the end of the response body."""

    def __post_init__(self) -> None:
        _check_bounds(self)


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
        _check_bounds(self)


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
        _check_bounds(self)


@dataclass(frozen=True, slots=True)
class Grpc:
    """The gRPC server's connections: message size, keepalive, handshake, counts and ages."""

    max_message_bytes: int = setting("max_message_bytes", 16 * 1024 * 1024, AT_LEAST_ONE)
    """Largest gRPC message accepted or sent (one Send, or one stream chunk)."""
    keepalive_time_seconds: float = setting("keepalive_time_seconds", 60.0, POSITIVE)
    """Idle time after which the server pings a connection, to find dead peers."""
    keepalive_timeout_seconds: float = setting("keepalive_timeout_seconds", 20.0, POSITIVE)
    """Time a keepalive ping has to be answered before the connection is closed."""
    keepalive_min_client_interval_seconds: float = setting(
        "keepalive_min_client_interval_seconds", 10.0, POSITIVE
    )
    """Shortest interval between a client's keepalive pings the server tolerates."""
    handshake_timeout_seconds: float = setting("handshake_timeout_seconds", 10.0, POSITIVE)
    """Time a new connection has to finish its handshake (TLS, then HTTP/2's preface and SETTINGS);
    past it the connection is closed."""
    max_connection_idle_seconds: float = setting("max_connection_idle_seconds", 60.0, NOT_NEGATIVE)
    """Time a connection may stay open with no call under way before it is closed (GOAWAY); 0: never."""
    max_connections: int = setting("max_connections", 0, NOT_NEGATIVE)
    """Client connections the gRPC port holds at once; more are closed on arrival. 0: the open-file
    limit less what the gateway keeps for Braze (upstream_pool_size), Redis, the admin port and files."""
    max_streams_per_connection: int = setting("max_streams_per_connection", 100, AT_LEAST_ONE)
    """Calls (HTTP/2 streams) one connection may have open at once, counted until the gateway has
    let go of them, so streams opened and reset at once are refused past it too (rapid reset)."""
    max_connection_age_seconds: float = setting("max_connection_age_seconds", 300.0, NOT_NEGATIVE)
    """Age at which a client connection is asked to reconnect (GOAWAY), so clients behind a
    balancer spread over new replicas; 0: never. Calls under way finish first."""
    max_connection_age_grace_seconds: float = setting("max_connection_age_grace_seconds", 0.0, NOT_NEGATIVE)
    """After a connection's max age, time its calls under way still get; 0: as long as they take."""

    def __post_init__(self) -> None:
        _check_bounds(self)

    def options(self, *, connections: int | None, reuse_port: bool) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments: message sizes, keepalive, connection limits.

        `connections` is the cap on client connections (None: none, see
        `Settings.connection_cap`); `reuse_port` lets the workers of one set share the port."""

        def ms(seconds: float) -> int:
            return round(seconds * 1000)

        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # A second gateway on a bound port must fail, unless it is a worker of the same set.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
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
        if connections is not None:
            options.append(("grpc.max_allowed_incoming_connections", connections))
        if self.max_connection_age_seconds:
            options.append(("grpc.max_connection_age_ms", ms(self.max_connection_age_seconds)))
            if self.max_connection_age_grace_seconds:
                options.append(
                    ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_seconds))
                )
        return options


@dataclass(frozen=True, slots=True)
class Calls:
    """The calls on the gRPC port: how long they may wait, and how many streams are held."""

    request_message_timeout_seconds: float = setting("request_message_timeout_seconds", 30.0, POSITIVE)
    """Time a unary call (Send, a health check) has to deliver its request message once started;
    past it the call ends DEADLINE_EXCEEDED, nothing done."""
    stream_header_timeout_seconds: float = setting("stream_header_timeout_seconds", 10.0, POSITIVE)
    """Time a SendStream has to send its header; past it the stream ends DEADLINE_EXCEEDED."""
    stream_idle_timeout_seconds: float = setting("stream_idle_timeout_seconds", 60.0, POSITIVE)
    """Time a SendStream may send nothing while none of its batches is in flight; past it the
    stream ends DEADLINE_EXCEEDED after the results of what it sent, saying where to resume."""
    max_streams: int = setting("max_streams", 1000, AT_LEAST_ONE)
    """SendStreams this process holds open at once, all tenants; more are refused RESOURCE_EXHAUSTED."""
    max_streams_per_tenant: int = setting("max_streams_per_tenant", 100, AT_LEAST_ONE)
    """SendStreams one tenant may hold open at once in this process; more are refused RESOURCE_EXHAUSTED."""

    def __post_init__(self) -> None:
        _check_bounds(self)


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

    def __post_init__(self) -> None:
        _check_bounds(self)
        if self.redis_failure not in ("open", "closed"):
            raise ConfigError(f"{ENV_PREFIX}REDIS_FAILURE must be open or closed")
        if self.redis_url:
            _check_redis_url(self.redis_url)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The ordered shutdown on SIGTERM."""

    delay_seconds: float = setting("shutdown_delay_seconds", 5.0, NOT_NEGATIVE)
    """On SIGTERM, how long not-ready is announced (health, /readyz) before new requests are refused."""
    grace_seconds: float = setting("shutdown_grace_seconds", 25.0, NOT_NEGATIVE)
    """Then, how long in-flight requests may finish before their batches are abandoned with results."""

    def __post_init__(self) -> None:
        _check_bounds(self)


@dataclass(frozen=True, slots=True)
class Settings:
    """Gateway settings, by group. `Tenants` is last: with nothing else wrong, its error (no
    tenants file, no demo) is the one an operator sees."""

    listen: Listen = field(default_factory=Listen)
    telemetry: Telemetry = field(default_factory=Telemetry)
    workers: Workers = field(default_factory=Workers)
    upstream: Upstream = field(default_factory=Upstream)
    retry: Retry = field(default_factory=Retry)
    sending: Sending = field(default_factory=Sending)
    grpc: Grpc = field(default_factory=Grpc)
    calls: Calls = field(default_factory=Calls)
    state: State = field(default_factory=State)
    shutdown: Shutdown = field(default_factory=Shutdown)
    tenants: Tenants = field(default_factory=Tenants)

    def connection_cap(self, open_files: int | None) -> int | None:
        """Most client connections on the gRPC port: max_connections, else what the open-file
        limit `open_files` (None: unlimited) leaves after the gateway's own files (None: no limit)."""
        if self.grpc.max_connections:
            return self.grpc.max_connections
        if open_files is None:
            return None
        pool = self.upstream.pool_size
        cap = open_files - pool - RESERVED_FILES
        if cap < 1:
            raise ConfigError(
                f"the open-file limit ({open_files}) leaves no connections for the gRPC port once "
                f"{pool} (CGW_UPSTREAM_POOL_SIZE) and {RESERVED_FILES} are kept for "
                f"Braze and the gateway's own files: raise it (ulimit -n) or set {ENV_PREFIX}MAX_CONNECTIONS"
            )
        return cap

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from CGW_CONFIG_FILE, then CGW_* variables, then `overrides`; the keys
        of the file and of `overrides` are the flat names (`demo=True`, `upstream_pool_size=4`)."""
        raw: dict[str, Any] = {}
        config_file = environ.get(CONFIG_FILE_ENV)
        if config_file:
            raw.update(_read_toml(Path(config_file)))
        for name in SETTINGS:
            value = environ.get(env_name(name))
            if value is not None:
                raw[name] = value
        names = {env_name(name) for name in SETTINGS} | {CONFIG_FILE_ENV, WORKER_INDEX_ENV, WORKER_DIR_ENV}
        mistyped = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in names)
        if mistyped:
            raise ConfigError(f"unknown settings in the environment: {', '.join(mistyped)}")
        raw.update(overrides)
        unknown = sorted(set(raw) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        values: dict[str, dict[str, Any]] = {spec.name: {} for spec in fields(cls)}
        for name, value in raw.items():
            where = SETTINGS[name]
            values[where.group][where.field] = _coerce(name, value, type(where.default))
        groups: dict[str, Any] = {name: _GROUPS[name](**values[name]) for name in values}
        return cls(**groups)


class Setting(NamedTuple):
    """One row of `SETTINGS`: where a flat name lives in `Settings`, and its default."""

    group: str
    field: str
    default: Any


_GROUPS: Final[Mapping[str, type[DataclassInstance]]] = get_type_hints(Settings)


def _table() -> dict[str, Setting]:
    table: dict[str, Setting] = {}
    for group, kind in _GROUPS.items():
        for spec in fields(kind):
            table[spec.metadata["name"]] = Setting(group, spec.name, spec.default)
    return table


SETTINGS: Final[Mapping[str, Setting]] = _table()
"""Every setting by its flat name (env CGW_ + the name in upper case, TOML key the name)."""


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What the supervisor tells each worker it starts, in WORKER_INDEX_ENV and WORKER_DIR_ENV:
    its index, and the supervisor's private folder (admin sockets, shared budgets). Not a setting:
    no operator sets it."""

    index: int
    folder: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerRole | None:
        """The role the supervisor gave this process; None when it is not a worker."""
        try:
            index = int(environ.get(WORKER_INDEX_ENV, "-1"))
        except ValueError:
            raise ConfigError(f"{WORKER_INDEX_ENV} must be a int") from None
        if index < 0:
            return None
        if not environ.get(WORKER_DIR_ENV):
            raise ConfigError(f"{WORKER_INDEX_ENV} is set by the supervisor, with {WORKER_DIR_ENV}")
        return cls(index, environ[WORKER_DIR_ENV])

    def environ(self) -> dict[str, str]:
        """The variables the supervisor sets for this worker."""
        return {WORKER_INDEX_ENV: str(self.index), WORKER_DIR_ENV: self.folder}


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
