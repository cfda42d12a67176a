"""The settings of the gRPC side: where the gateway listens (`Listen`), its connections (`Grpc`)
and its calls (`Calls`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .spec import AT_LEAST_ONE, ENV_PREFIX, NOT_NEGATIVE, POSITIVE, check_address, check_bounds, setting


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
        check_address("grpc_address", self.grpc_address, "127.0.0.1:50051")
        check_address("admin_address", self.admin_address, "127.0.0.1:8081")
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
        check_bounds(self)

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
    native_recipients: bool = setting("native_recipients", True)
    """Read SendStream chunks and unary Sends of common recipients with the compiled path
    (`edge.native`) when it is installed; false, or not installed: the Python path, which gives
    the same bodies."""

    def __post_init__(self) -> None:
        check_bounds(self)
