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

The groups live by side: `edge` (Listen, Grpc, Calls), `batches` (Upstream, Retry, Sending, State),
`process` (Tenants, Workers, Telemetry, Shutdown, and WorkerRole); `spec` is how a field is
declared and checked. Import them all from here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, get_type_hints

from ..errors import ConfigError
from .batches import Retry, Sending, State, Upstream
from .edge import Calls, Grpc, Listen
from .process import WORKER_DIR_ENV, WORKER_INDEX_ENV, Shutdown, Telemetry, Tenants, WorkerRole, Workers
from .spec import (
    AT_LEAST_ONE,
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    NOT_NEGATIVE,
    POSITIVE,
    Bound,
    env_name,
    setting,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "AT_LEAST_ONE",
    "CONFIG_FILE_ENV",
    "ENV_PREFIX",
    "NOT_NEGATIVE",
    "POSITIVE",
    "RESERVED_FILES",
    "SETTINGS",
    "WORKER_DIR_ENV",
    "WORKER_INDEX_ENV",
    "Bound",
    "Calls",
    "Grpc",
    "Listen",
    "Retry",
    "Sending",
    "Setting",
    "Settings",
    "Shutdown",
    "State",
    "Telemetry",
    "Tenants",
    "Upstream",
    "WorkerRole",
    "Workers",
    "env_name",
    "setting",
]

RESERVED_FILES = 128
"""Open files a gateway process keeps beside its Braze pool when it derives its connection cap:
Redis, the admin port, log and tenants files, gRPC's and asyncio's own (about 50 measured idle)."""


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
