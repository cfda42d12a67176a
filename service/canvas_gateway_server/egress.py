"""How calls to Braze leave the network: directly, or through an HTTP(S) proxy (issue 21).

The route of a Braze URL is decided once (BrazeClient keeps it with the tenant's parsed URL), from,
in falling priority: the tenant's `proxy` in the tenants file (`"none"`: direct), the gateway's
CGW_UPSTREAM_PROXY (`"none"`: direct, whatever the environment says), then the standard
`https_proxy`/`HTTPS_PROXY` (https Braze URLs) or `http_proxy`/`HTTP_PROXY` (http ones), lowercase
first, with `no_proxy`/`NO_PROXY` and CGW_UPSTREAM_NO_PROXY naming the hosts reached directly.

Why not aiohttp's `trust_env=True`: it reads the environment on every call, in a thread; a
malformed variable fails each call instead of the boot; it cannot route one tenant differently;
and it would read ~/.netrc too. Here the variables are read from the mapping the gateway is given,
once, checked at boot in words that never quote them.

An https Braze URL goes through the proxy as a CONNECT tunnel: TLS runs from the gateway to Braze
end to end, and the proxy's credentials go in the CONNECT's Proxy-Authorization only (never
inside the tunnel). An http URL (loopback or allow_insecure_http) is forwarded by the proxy, so
its Proxy-Authorization travels with the request. A proxy's credentials are taken out of its URL
here: aiohttp, its errors and our logs only ever see the URL without them, and `secrets()` lists
them for log redaction.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

import aiohttp
import yarl

from .errors import ConfigError

DIRECT_WORD: Final = "none"
"""The value of CGW_UPSTREAM_PROXY or a tenant's `proxy` that means: no proxy."""


@dataclass(frozen=True, slots=True)
class Route:
    """The proxy a Braze URL is reached through (None: directly), with the value of its
    Proxy-Authorization header ("" for none). `repr` never shows the credentials."""

    proxy: yarl.URL | None = None
    authorization: str = field(default="", repr=False)
    secrets: frozenset[str] = field(default=frozenset(), repr=False)
    """The user's password, the user:password pair and the header value, for log redaction."""

    def proxy_headers(self) -> Mapping[str, str] | None:
        """Headers for the proxy alone: the CONNECT of an https URL."""
        return {"Proxy-Authorization": self.authorization} if self.authorization else None


DIRECT: Final = Route()


def parse_proxy(text: str, where: str) -> Route:
    """A proxy URL (`http://[user:password@]host:port`, https://..., or host:port for http) as a
    Route; "none" is DIRECT. Errors name `where`, never the URL: it may hold a password."""
    text = text.strip()
    if text.lower() == DIRECT_WORD:
        return DIRECT
    if "://" not in text:
        text = "http://" + text  # curl's reading of a bare host:port
    try:
        url = yarl.URL(text)
        url.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ConfigError(f"{where} is not a valid proxy URL") from None
    if url.scheme not in ("http", "https"):
        raise ConfigError(f"{where} must be an http:// or https:// proxy URL (or {DIRECT_WORD})")
    if not url.host:
        raise ConfigError(f"{where} must name the proxy's host, such as http://proxy.internal:3128")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise ConfigError(f"{where} must be the proxy's base URL (no path, query or fragment)")
    bare = url.with_user(None).with_path("")
    if url.raw_user is None and url.raw_password is None:
        return Route(bare)
    user, password = unquote(url.raw_user or ""), unquote(url.raw_password or "")
    authorization = aiohttp.encode_basic_auth(user, password)
    raw = f"{url.raw_user or ''}:{url.raw_password or ''}"
    token = authorization.split(" ", 1)[1]
    secrets = frozenset(
        s for s in (password, f"{user}:{password}", raw, authorization, token) if s and s != ":"
    )
    return Route(bare, authorization, secrets)


@dataclass(frozen=True, slots=True)
class NoProxy:
    """Hosts reached directly, in NO_PROXY's common syntax (curl, Go, Python): entries separated
    by commas or spaces; `*` for every host; a domain (with or without a leading `.` or `*.`)
    matches itself and its subdomains; `host:port` only that port; an IP address itself; a CIDR
    block (10.0.0.0/8) the IP addresses in it. Loopback is not excluded unless named."""

    everything: bool = False
    domains: tuple[tuple[str, int | None], ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, *texts: str) -> NoProxy:
        everything = False
        domains: list[tuple[str, int | None]] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in texts:
            for entry in text.replace(",", " ").lower().split():
                if entry == "*":
                    everything = True
                    continue
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                    continue
                except ValueError:
                    pass
                host, port = entry, None
                if entry.startswith("["):  # [v6]:port
                    host, _, rest = entry[1:].partition("]")
                    port = int(rest[1:]) if rest[1:].isdigit() else None
                elif entry.count(":") == 1 and entry.rpartition(":")[2].isdigit():
                    host, _, digits = entry.rpartition(":")
                    port = int(digits)
                try:
                    address = ipaddress.ip_address(host)
                except ValueError:
                    domains.append((host.removeprefix("*").lstrip(".").rstrip("."), port))
                else:
                    domains.append((str(address), port))
        return cls(everything, tuple(d for d in domains if d[0]), tuple(networks))

    def excludes(self, url: yarl.URL) -> bool:
        """Whether `url` is reached directly."""
        if self.everything:
            return True
        host = (url.host or "").lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and any(address in network for network in self.networks):
            return True
        for domain, port in self.domains:
            if port is not None and port != url.port:
                continue
            if host == domain or (address is None and host.endswith("." + domain)):
                return True
        return False


@dataclass(frozen=True, slots=True)
class Egress:
    """The gateway's routes to Braze: a proxy per URL scheme (None: direct) and the hosts that
    bypass it. `route(url, tenant_proxy)` is asked once per tenant URL."""

    https: Route = DIRECT
    http: Route = DIRECT
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def from_settings(cls, proxy: str, no_proxy: str, environ: Mapping[str, str]) -> Egress:
        """From CGW_UPSTREAM_PROXY (`proxy`: a URL for every scheme, "none", or "" for the
        standard variables in `environ`) and CGW_UPSTREAM_NO_PROXY (`no_proxy`)."""
        if proxy.strip():
            route = parse_proxy(proxy, "CGW_UPSTREAM_PROXY")
            return cls(route, route, NoProxy.parse(no_proxy))
        https, http = _variable(environ, "https_proxy"), _variable(environ, "http_proxy")
        return cls(
            parse_proxy(https[1], https[0]) if https else DIRECT,
            parse_proxy(http[1], http[0]) if http else DIRECT,
            NoProxy.parse(no_proxy, (_variable(environ, "no_proxy") or ("", ""))[1]),
        )

    def route(self, url: yarl.URL, tenant_proxy: str = "") -> Route:
        """The route of a Braze URL: the tenant's own proxy when it names one ("none": direct),
        else the gateway's for the URL's scheme, unless NO_PROXY excludes its host."""
        if tenant_proxy:
            return parse_proxy(tenant_proxy, "the tenant's proxy")
        route = self.https if url.scheme == "https" else self.http
        if route.proxy is None or self.no_proxy.excludes(url):
            return DIRECT
        return route

    def secrets(self) -> frozenset[str]:
        """The proxies' credentials, for log redaction."""
        return self.https.secrets | self.http.secrets


def _variable(environ: Mapping[str, str], lower: str) -> tuple[str, str] | None:
    """(name, value) of the lowercase variable, else the uppercase one; None when both are unset
    or empty (an empty variable means no proxy, as in curl)."""
    for name in (lower, lower.upper()):
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None
