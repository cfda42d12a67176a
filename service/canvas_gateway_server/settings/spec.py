"""How a settings group declares a field: its flat name, its default and its bound; the checks
every group shares. The flat name is the operator's: the environment variable is CGW_ + it in upper
case, the TOML key is it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import urlsplit

from ..errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "CGW_"
CONFIG_FILE_ENV: Final = f"{ENV_PREFIX}CONFIG_FILE"

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


def check_bounds(group: DataclassInstance) -> None:
    for spec in fields(group):
        bound: Bound | None = spec.metadata["bound"]
        if bound is not None and not bound.holds(getattr(group, spec.name)):
            raise ConfigError(f"{env_name(spec.metadata['name'])} {bound.words}")


def check_address(name: str, address: str, example: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{env_name(name)} must be host:port, such as {example}")


def check_redis_url(url: str) -> None:
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
