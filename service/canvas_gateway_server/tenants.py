"""Tenants: who may call, with which Braze key and instance, within which limits.

A tenant is resolved only from the bearer token its callers present, so no caller can
pick another tenant's key. Tokens are stored as SHA-256 digests and compared in constant
time. The TOML file (see docs/configuration.md) is read at boot and again on SIGHUP; a reload that fails
keeps the previous tenants, and requests in flight keep the Tenant they started with.
The file's [workspaces.<name>] tables are read by `workspaces`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from .braze import CONTEXT_NAMES
from .egress import DIRECT_WORD, parse_proxy
from .errors import ConfigError
from .loopback import is_loopback
from .rate_budget import DEFAULT_POLICY, LANES, WorkspacePolicy
from .workspaces import parse_workspace

_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_KEY_SOURCES = ("braze_api_key", "braze_api_key_env", "braze_api_key_file")
AUDIENCE_BUDGETS = ("any_audience", "broadcast_only")
TENANT_LANES = ("auto", *LANES)
_FIELDS = frozenset(
    {
        "workspace",
        "lane",
        "token_sha256",
        "braze_rest_url",
        "allow_broadcast",
        "allow_insecure_http",
        "max_concurrent_batches",
        "context_name",
        "audience_budget",
        "proxy",
        "propagate_trace",
        "retry_502",
    }
    | set(_KEY_SOURCES)
)


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant's Braze workspace. `repr` never shows the key."""

    id: str
    braze_rest_url: str
    braze_api_key: str = field(repr=False)
    allow_broadcast: bool = False
    max_concurrent_batches: int | None = None
    context_name: str = "context"
    """The name the context object goes out under: `context`, or the legacy
    `canvas_entry_properties` for workspaces that still use it (CONTRACT.md 8, point 2)."""
    audience_budget: str = "any_audience"
    """Which calls draw on Braze's per-minute broadcast budgets (CONTRACT.md 8, point 21):
    `any_audience` (every call with an `audience`, the safer reading) or `broadcast_only`
    (only calls without recipients)."""
    proxy: str = field(default="", repr=False)
    """The proxy to this tenant's Braze (a URL, or `none` for direct), in place of the gateway's
    (CGW_UPSTREAM_PROXY / HTTPS_PROXY); empty: the gateway's. Its credentials are secrets."""
    retry_502: bool = False
    """Call again after a 502, which Braze documents as failing before the request reached its
    server (CONTRACT.md 8, point 32): off by default, since no client can prove where a 502 was
    made; a 502 is then UNKNOWN, as every 5xx."""
    propagate_trace: bool = False
    """Send the Braze call's W3C `traceparent`/`tracestate` to Braze (when tracing is on): off by
    default, so no internal trace id goes to a third party unless the tenant asks."""
    workspace: str = ""
    """The Braze workspace whose budgets the tenant spends (tenants naming one share them);
    "": one named after a digest of its REST URL and key (`workspace_name`)."""
    policy: WorkspacePolicy = DEFAULT_POLICY
    """The workspace's headroom (`[workspaces.<name>]`): what the gateway leaves to others."""
    lane: str = "auto"
    """`auto` (unary Send transactional, SendStream bulk), or every call in `bulk` or
    `transactional`."""

    @property
    def workspace_name(self) -> str:
        """The name its budgets are kept under, in metrics, logs and Redis: never the key."""
        return self.workspace or derived_workspace(self.braze_rest_url, self.braze_api_key)


def derived_workspace(url: str, key: str) -> str:
    """A workspace's name from its REST URL and key: a digest (the key cannot be read from it)."""
    digest = hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8, person=b"cgw-workspace").hexdigest()
    return f"auto-{digest}"


class TenantDirectory(Protocol):
    """Resolves a presented bearer token to its tenant."""

    def authenticate(self, token: str) -> Tenant | None: ...

    def secrets(self) -> frozenset[str]:
        """Every Braze key and tenant proxy's credentials it holds, for log redaction."""
        ...

    def tenant_ids(self) -> frozenset[str]:
        """The ids of the tenants it holds (readiness, metrics)."""
        ...

    def reload(self) -> bool:
        """Read the tenants again where they come from; False when there is nothing to reread.
        Raises ConfigError, keeping the tenants it had, when the new ones are invalid."""
        ...


def token_digest(token: str) -> str:
    """The SHA-256 hex digest under which a bearer token is configured."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class StaticTenantDirectory:
    """Tenants held in memory; the file-backed directory swaps one of these on reload."""

    def __init__(self, entries: Iterable[tuple[Tenant, Iterable[str]]]) -> None:
        pairs: list[tuple[bytes, Tenant]] = []
        for tenant, digests in entries:
            for digest in digests:
                if any(hmac.compare_digest(digest.encode(), known) for known, _ in pairs):
                    raise ConfigError(f"tenant {tenant.id}: a token digest is used twice")
                pairs.append((digest.encode(), tenant))
        self._pairs = tuple(pairs)
        self._secrets = frozenset(tenant.braze_api_key for _, tenant in pairs).union(
            *(parse_proxy(tenant.proxy, "proxy").secrets for _, tenant in pairs if tenant.proxy)
        )
        self._ids = frozenset(tenant.id for _, tenant in pairs)

    def authenticate(self, token: str) -> Tenant | None:
        presented = token_digest(token).encode()
        found: Tenant | None = None
        for digest, tenant in self._pairs:  # no early exit: time does not depend on the match
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    def secrets(self) -> frozenset[str]:
        return self._secrets

    def tenant_ids(self) -> frozenset[str]:
        return self._ids

    def reload(self) -> bool:
        return False  # held in memory: nothing to reread


class FileTenantDirectory:
    """Tenants from a TOML file, reloaded on demand (SIGHUP)."""

    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self._path = path
        self._environ = environ
        self._current = load_tenants(path, environ)

    def reload(self) -> bool:
        """Read the file again; on error keep the tenants we have and raise ConfigError."""
        self._current = load_tenants(self._path, self._environ)
        return True

    def authenticate(self, token: str) -> Tenant | None:
        return self._current.authenticate(token)

    def secrets(self) -> frozenset[str]:
        return self._current.secrets()

    def tenant_ids(self) -> frozenset[str]:
        return self._current.tenant_ids()


def load_tenants(path: Path, environ: Mapping[str, str]) -> StaticTenantDirectory:
    """Parse and check a tenants file; every problem is a ConfigError naming the tenant."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read tenants file {path}: {exc}") from None
    tenants = data.get("tenants")
    if not isinstance(tenants, dict) or not tenants or not set(data) <= {"tenants", "workspaces"}:
        raise ConfigError(
            f"{path}: expected one or more [tenants.<id>] tables, [workspaces.<name>] tables and nothing else"
        )
    workspaces = data.get("workspaces", {})
    if not isinstance(workspaces, dict):
        raise ConfigError(f"{path}: workspaces must be [workspaces.<name>] tables")
    policies = {name: parse_workspace(name, entry) for name, entry in workspaces.items()}
    return StaticTenantDirectory(
        parse_tenant(tenant_id, entry, environ, base=path.parent, workspaces=policies)
        for tenant_id, entry in tenants.items()
    )


def parse_tenant(
    tenant_id: str,
    entry: Any,
    environ: Mapping[str, str],
    base: Path,
    workspaces: Mapping[str, WorkspacePolicy] | None = None,
) -> tuple[Tenant, tuple[str, ...]]:
    """One [tenants.<id>] table as a Tenant and its token digests."""
    where = f"tenant {tenant_id!r}"
    if not _TENANT_ID.match(tenant_id):
        raise ConfigError(f"{where}: ids are 1-63 of a-z, 0-9, _ and -")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {', '.join(unknown)}")
    digests = entry.get("token_sha256")
    if (
        not isinstance(digests, list)
        or not digests
        or not all(isinstance(d, str) and _DIGEST.match(d) for d in digests)
    ):
        raise ConfigError(f"{where}: token_sha256 must list lowercase hex SHA-256 digests")
    url = _check_url(where, entry.get("braze_rest_url"), bool(entry.get("allow_insecure_http", False)))
    limit = entry.get("max_concurrent_batches")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"{where}: max_concurrent_batches must be a positive integer")
    allow_broadcast = entry.get("allow_broadcast", False)
    if not isinstance(allow_broadcast, bool):
        raise ConfigError(f"{where}: allow_broadcast must be true or false")
    audience_budget = entry.get("audience_budget", "any_audience")
    if audience_budget not in AUDIENCE_BUDGETS:
        raise ConfigError(f"{where}: audience_budget must be one of {', '.join(AUDIENCE_BUDGETS)}")
    propagate_trace = entry.get("propagate_trace", False)
    if not isinstance(propagate_trace, bool):
        raise ConfigError(f"{where}: propagate_trace must be true or false")
    retry_502 = entry.get("retry_502", False)
    if not isinstance(retry_502, bool):
        raise ConfigError(f"{where}: retry_502 must be true or false")
    context_name = entry.get("context_name", "context")
    if context_name not in CONTEXT_NAMES:
        raise ConfigError(f"{where}: context_name must be one of {', '.join(CONTEXT_NAMES)}")
    proxy = entry.get("proxy", "")
    if not isinstance(proxy, str) or (proxy and not proxy.strip()):
        raise ConfigError(f"{where}: proxy must be a proxy URL or {DIRECT_WORD!r}")
    if proxy:
        parse_proxy(proxy, f"{where}: proxy")
    workspace = entry.get("workspace", "")
    if workspace != "" and (not isinstance(workspace, str) or workspace not in (workspaces or {})):
        raise ConfigError(f"{where}: workspace must name a [workspaces.<name>] table")
    lane = entry.get("lane", "auto")
    if lane not in TENANT_LANES:
        raise ConfigError(f"{where}: lane must be one of {', '.join(TENANT_LANES)}")
    tenant = Tenant(
        id=tenant_id,
        workspace=workspace,
        policy=(workspaces or {}).get(workspace, DEFAULT_POLICY),
        lane=lane,
        braze_rest_url=url,
        braze_api_key=_read_key(where, entry, environ, base),
        allow_broadcast=allow_broadcast,
        max_concurrent_batches=limit,
        context_name=context_name,
        audience_budget=audience_budget,
        proxy=proxy.strip(),
        propagate_trace=propagate_trace,
        retry_502=retry_502,
    )
    return tenant, tuple(digests)


def _check_url(where: str, url: Any, allow_insecure_http: bool) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{where}: braze_rest_url is required")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{where}: braze_rest_url must be an http(s) base URL")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}: braze_rest_url must not carry credentials (user:password@)")
    if parts.scheme == "http" and not (allow_insecure_http or is_loopback(parts.hostname)):
        raise ConfigError(
            f"{where}: braze_rest_url must be https (http only to loopback or with allow_insecure_http)"
        )
    return url.rstrip("/")


def _read_key(where: str, entry: Mapping[str, Any], environ: Mapping[str, str], base: Path) -> str:
    sources = [name for name in _KEY_SOURCES if name in entry]
    if len(sources) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(_KEY_SOURCES)}")
    source = sources[0]
    reference = entry[source]
    if not isinstance(reference, str) or not reference:
        raise ConfigError(f"{where}: {source} must be a non-empty string")
    if source == "braze_api_key":
        key = reference
    elif source == "braze_api_key_env":
        key = environ.get(reference, "")
        if not key:
            raise ConfigError(f"{where}: environment variable {reference} is unset or empty")
    else:
        path = base / os.path.expanduser(reference)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read braze_api_key_file: {type(exc).__name__}") from None
    if not key or any(ch.isspace() or ch == '"' for ch in key):
        raise ConfigError(f"{where}: the Braze API key is empty or has spaces or quotes")
    return key
