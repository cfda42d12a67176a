"""The settings of the process: whom it serves (`Tenants`), in how many processes (`Workers`), what
it says about itself (`Telemetry`), how it stops (`Shutdown`); and `WorkerRole`, which is not a
setting: the supervisor's word to each worker it starts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError
from .spec import ENV_PREFIX, NOT_NEGATIVE, check_bounds, setting

WORKER_INDEX_ENV: Final = f"{ENV_PREFIX}WORKER_INDEX"
WORKER_DIR_ENV: Final = f"{ENV_PREFIX}WORKER_DIR"


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
class Workers:
    """How many processes serve the gRPC port."""

    count: int = setting("workers", 0, NOT_NEGATIVE)
    """Worker processes serving the gRPC port (SO_REUSEPORT) behind one admin port; 0: one per
    core (CPU affinity, capped by a cgroup CPU quota). 1 runs a single process, as does the demo."""

    def __post_init__(self) -> None:
        check_bounds(self)


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
class Shutdown:
    """The ordered shutdown on SIGTERM."""

    delay_seconds: float = setting("shutdown_delay_seconds", 5.0, NOT_NEGATIVE)
    """On SIGTERM, how long not-ready is announced (health, /readyz) before new requests are refused."""
    grace_seconds: float = setting("shutdown_grace_seconds", 25.0, NOT_NEGATIVE)
    """Then, how long in-flight requests may finish before their batches are abandoned with results."""

    def __post_init__(self) -> None:
        check_bounds(self)


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
