"""Braze reached through an HTTP proxy (issue 21): routes, NO_PROXY, credentials kept secret, and
what a proxy's refusals mean for retries; proven with a real squid on 127.0.0.1 between a real
gateway and the fake Braze, over TLS (a CONNECT tunnel) and plain http (forwarding)."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
import yarl
from aiohttp import web
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.__main__ import main
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.demo import DEMO_TOKEN
from canvas_gateway_server.egress import DIRECT, Egress, NoProxy, parse_proxy
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.redaction import redact
from canvas_gateway_server.settings import Settings
from canvas_gateway_server.tenants import load_tenants, token_digest
from fake_braze import FakeBraze, FakeBrazeConfig, Fault
from prometheus_client import generate_latest
from servers import Proxy, squid, start_logged_replica, stop_process
from support import KEYS, LOCAL, TOKENS, free_port, trigger_from_json

BODY = {"canvas_id": "c-1", "recipients": [{"external_user_id": "u1"}, {"external_user_id": "u2"}]}
USER, PASSWORD = "gateway", "s3cr3t-pr0xy-pw"
SECRET_URL = f"http://{USER}:{PASSWORD}@127.0.0.1:3128"


# --- NO_PROXY and proxy URLs, no server ---


@pytest.mark.parametrize(
    ("no_proxy", "url", "excluded"),
    [
        ("braze.com", "https://rest.iad-01.braze.com/x", True),
        (".braze.com", "https://rest.iad-01.braze.com/x", True),
        ("*.braze.com", "https://braze.com/x", True),
        ("braze.com", "https://notbraze.com/x", False),
        ("rest.iad-01.braze.com:443", "https://rest.iad-01.braze.com/x", True),
        ("rest.iad-01.braze.com:8443", "https://rest.iad-01.braze.com/x", False),
        ("*", "https://anything.example/x", True),
        ("10.0.0.0/8, 192.168.1.1", "http://10.1.2.3:80/x", True),
        ("10.0.0.0/8 192.168.1.1", "http://192.168.1.1/x", True),
        ("10.0.0.0/8", "http://11.0.0.1/x", False),
        ("127.0.0.1", "http://127.0.0.1:9/x", True),
        ("127.0.0.1:9", "http://127.0.0.1:10/x", False),
        ("::1", "http://[::1]:9/x", True),
        ("[::1]:9", "http://[::1]:9/x", True),
        ("fd00::/8", "http://[fd00::5]/x", True),
        ("localhost", "http://127.0.0.1/x", False),  # names are not resolved
        ("", "https://rest.iad-01.braze.com/x", False),
        ("BRAZE.COM.", "https://Rest.Braze.com/x", True),
    ],
)
def test_no_proxy_follows_the_common_syntax(no_proxy: str, url: str, excluded: bool) -> None:
    assert NoProxy.parse(no_proxy).excludes(yarl.URL(url)) is excluded


def test_a_proxy_url_loses_its_credentials_to_a_header_and_the_secrets() -> None:
    route = parse_proxy("http://us%40er:p%3Ass@proxy.internal:3128/", "X")
    assert route.proxy == yarl.URL("http://proxy.internal:3128")
    assert route.authorization.startswith("Basic ")
    assert {"p:ss", "us@er:p:ss", route.authorization} <= route.secrets
    assert "p:ss" not in repr(route) and "Basic" not in repr(route)
    assert route.proxy_headers() == {"Proxy-Authorization": route.authorization}
    assert parse_proxy("proxy.internal:3128", "X").proxy == yarl.URL("http://proxy.internal:3128")
    assert parse_proxy(" NONE ", "X") is DIRECT and DIRECT.proxy_headers() is None
    assert parse_proxy("https://proxy.internal:443", "X").authorization == ""


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("socks5://user:s3cr3t@proxy:1080", "http:// or https://"),
        ("http:///", "name the proxy's host"),
        ("http://user:s3cr3t@:3128", "not a valid proxy URL"),
        ("http://user:s3cr3t@proxy:99999", "not a valid proxy URL"),
        ("http://user:s3cr3t@proxy:3128/path", "base URL"),
        ("http://user:s3cr3t@proxy:3128?x=1", "base URL"),
    ],
)
def test_a_bad_proxy_url_is_refused_without_quoting_it(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_proxy(text, "CGW_UPSTREAM_PROXY")
    assert words in str(caught.value) and "s3cr3t" not in str(caught.value)
    assert "CGW_UPSTREAM_PROXY" in str(caught.value)


def test_the_standard_variables_route_by_scheme_lowercase_first() -> None:
    environ = {
        "https_proxy": "http://lower:3128",
        "HTTPS_PROXY": "http://upper:3128",
        "HTTP_PROXY": "http://plain:3128",
        "NO_PROXY": "internal.example",
    }
    egress = Egress.from_settings("", "", environ)
    assert egress.route(yarl.URL("https://rest.braze.com/x")).proxy == yarl.URL("http://lower:3128")
    assert egress.route(yarl.URL("http://rest.braze.com/x")).proxy == yarl.URL("http://plain:3128")
    assert egress.route(yarl.URL("https://api.internal.example/x")) is DIRECT
    assert Egress.from_settings("", "", {"HTTPS_PROXY": " "}).route(yarl.URL("https://b/x")) is DIRECT
    assert Egress.from_settings("", "", {}) == Egress()


def test_the_explicit_setting_wins_over_the_environment_and_none_goes_direct() -> None:
    environ = {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "braze.com"}
    egress = Egress.from_settings("http://explicit:3128", "eu.braze.com", environ)
    assert egress.route(yarl.URL("https://rest.iad-01.braze.com/x")).proxy == yarl.URL("http://explicit:3128")
    assert egress.route(yarl.URL("http://rest.iad-01.braze.com/x")).proxy == yarl.URL("http://explicit:3128")
    assert egress.route(yarl.URL("https://rest.fra-01.eu.braze.com/x")) is DIRECT
    assert Egress.from_settings("none", "", environ).route(yarl.URL("https://rest.braze.com/x")) is DIRECT
    # CGW_UPSTREAM_NO_PROXY adds to NO_PROXY when the standard variables are used.
    both = Egress.from_settings("", "eu.braze.com", {**environ, "NO_PROXY": "other.example"})
    assert both.route(yarl.URL("https://rest.fra-01.eu.braze.com/x")) is DIRECT
    assert both.route(yarl.URL("https://x.other.example/x")) is DIRECT
    assert both.route(yarl.URL("https://rest.braze.com/x")).proxy == yarl.URL("http://env:3128")


def test_a_tenant_s_proxy_overrides_the_gateway_s() -> None:
    egress = Egress.from_settings("http://gateway:3128", "braze.com", {})
    url = yarl.URL("https://rest.iad-01.braze.com/x")
    assert egress.route(url, "none") is DIRECT
    assert egress.route(url, "http://tenant:8080").proxy == yarl.URL("http://tenant:8080")  # no exclusions
    assert egress.route(url) is DIRECT


def test_the_setting_is_checked_at_boot_and_never_shown() -> None:
    settings = Settings.from_env({"CGW_UPSTREAM_PROXY": SECRET_URL}, demo=True)
    assert settings.upstream.proxy == SECRET_URL and PASSWORD not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CGW_UPSTREAM_PROXY": f"ftp://{USER}:{PASSWORD}@proxy:21"}, demo=True)
    assert "CGW_UPSTREAM_PROXY" in str(caught.value) and PASSWORD not in str(caught.value)


async def test_a_bad_standard_variable_fails_the_boot_without_quoting_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "https://rest.iad-01.braze.com")
    with pytest.raises(ConfigError) as caught:
        await Gateway.start(
            settings, environ={"ACME_BRAZE_KEY": KEYS["acme"], "HTTPS_PROXY": "socks5://u:pw9@p:1"}
        )
    assert "HTTPS_PROXY" in str(caught.value) and "pw9" not in str(caught.value)


async def test_an_unreadable_ca_file_fails_the_boot(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    settings = _settings(tmp_path, "https://rest.iad-01.braze.com", upstream_ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="CGW_UPSTREAM_CA_FILE"):
        await Gateway.start(settings, environ={"ACME_BRAZE_KEY": KEYS["acme"]})


def test_tenants_file_takes_a_proxy_and_keeps_its_credentials_secret(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(_tenants("https://rest.iad-01.braze.com", SECRET_URL))
    tenants = load_tenants(path, {"ACME_BRAZE_KEY": KEYS["acme"]})
    tenant = tenants.authenticate(TOKENS["acme"])
    assert tenant is not None and tenant.proxy == SECRET_URL and PASSWORD not in repr(tenant)
    assert PASSWORD in tenants.secrets() and KEYS["acme"] in tenants.secrets()
    path.write_text(_tenants("https://rest.iad-01.braze.com", "none"))
    assert load_tenants(path, {"ACME_BRAZE_KEY": KEYS["acme"]}).secrets() == {KEYS["acme"]}
    for bad in (f"socks5://{USER}:{PASSWORD}@proxy:1080", "  "):
        path.write_text(_tenants("https://rest.iad-01.braze.com", bad))
        with pytest.raises(ConfigError) as caught:
            load_tenants(path, {"ACME_BRAZE_KEY": KEYS["acme"]})
        assert "tenant 'acme'" in str(caught.value) and PASSWORD not in str(caught.value)
    path.write_text(_tenants("https://rest.iad-01.braze.com", "").replace('proxy = ""', "proxy = 3128"))
    with pytest.raises(ConfigError, match="proxy must be a proxy URL"):
        load_tenants(path, {"ACME_BRAZE_KEY": KEYS["acme"]})


# --- through a real squid ---


@dataclass
class Run:
    gateway: Any  # a Gateway in this process, or a Replica
    stub: pb_grpc.CanvasGatewayServiceAsyncStub

    async def send(self, tenant: str = "acme") -> pb.BatchResult:
        response = await self.stub.Send(
            pb.SendRequest(trigger=trigger_from_json(BODY)),
            metadata=(("authorization", f"Bearer {TOKENS[tenant]}"),),
            timeout=30,
        )
        (result,) = response.results
        return result

    def exposition(self) -> str:
        return generate_latest(self.gateway.registry).decode()


def _tenants(url: str, proxy: str | None = None) -> str:
    text = (
        "[tenants.acme]\n"
        f'token_sha256 = ["{token_digest(TOKENS["acme"])}"]\n'
        f'braze_rest_url = "{url}"\n'
        'braze_api_key_env = "ACME_BRAZE_KEY"\n'
    )
    return text + (f'proxy = "{proxy}"\n' if proxy is not None else "")


def _settings(tmp_path: Path, url: str, proxy: str | None = None, **overrides: Any) -> Settings:
    (tmp_path / "tenants.toml").write_text(_tenants(url, proxy))
    return Settings.from_env(
        {},
        grpc_address="127.0.0.1:0",
        tenants_file=str(tmp_path / "tenants.toml"),
        retry_base_delay_seconds=0.01,
        **{**LOCAL, **overrides},
    )


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    url: str,
    environ: dict[str, str] | None = None,
    proxy: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Run]:
    """A real gateway for the acme tenant at `url`, with `environ` (HTTPS_PROXY, ...) and the CA of
    the fake's certificate; stopped on exit, so that squid logs its tunnels."""
    cert = tmp_path / "cert.pem"
    settings = _settings(
        tmp_path, url, proxy, upstream_ca_file=str(cert) if cert.exists() else "", **overrides
    )
    started = await Gateway.start(settings, environ={"ACME_BRAZE_KEY": KEYS["acme"], **(environ or {})})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{started.port}")
    try:
        yield Run(started, pb_grpc.CanvasGatewayServiceStub(channel))
    finally:
        await channel.close()
        await started.stop(grace=0)


def _server_tls(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1, kept in tmp_path/cert.pem
    (which `gateway` then trusts); made once per test."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if not cert.exists():
        openssl = shutil.which("openssl")
        assert openssl, "the tests need Debian's openssl package"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
async def tls_fake(tmp_path: Path) -> AsyncIterator[FakeBraze]:
    """The fake Braze over TLS, its self-signed certificate (for 127.0.0.1) in tmp_path/cert.pem."""
    fake = FakeBraze(FakeBrazeConfig(api_keys=frozenset(KEYS.values())))
    await fake.start("127.0.0.1", 0, tls=_server_tls(tmp_path))
    yield fake
    await fake.stop()


@pytest.fixture
async def plain_fake() -> AsyncIterator[FakeBraze]:
    fake = FakeBraze(FakeBrazeConfig(api_keys=frozenset(KEYS.values())))
    await fake.start("127.0.0.1", 0)
    yield fake
    await fake.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    async with squid() as running:
        yield running


@pytest.fixture
async def auth_proxy() -> AsyncIterator[Proxy]:
    async with squid(credentials=(USER, PASSWORD)) as running:
        yield running


def _url(fake: FakeBraze) -> str:
    assert fake.url is not None
    return fake.url


def _port(url: str) -> int:
    port = yarl.URL(url).port
    assert port is not None
    return port


def _tunnels(proxy: Proxy, fake: FakeBraze) -> list[str]:
    return [
        line for line in proxy.access_log().splitlines() if f"CONNECT 127.0.0.1:{_port(_url(fake))}" in line
    ]


async def test_https_proxy_tunnels_tls_to_braze(tmp_path: Path, tls_fake: FakeBraze, proxy: Proxy) -> None:
    assert _url(tls_fake).startswith("https://")
    async with gateway(tmp_path, _url(tls_fake), {"HTTPS_PROXY": proxy.url, "NO_PROXY": "braze.com"}) as run:
        for _ in range(3):
            result = await run.send()
            assert result.outcome == pb.OUTCOME_SENT
    assert len(tls_fake.calls) == 3
    (tunnel,) = _tunnels(proxy, tls_fake)  # one pooled tunnel, logged once it closed
    assert "TCP_TUNNEL/200" in tunnel
    assert "/canvas/trigger/send" not in proxy.access_log()  # the proxy saw only the tunnel


async def test_no_proxy_covering_braze_bypasses_the_proxy(
    tmp_path: Path, tls_fake: FakeBraze, proxy: Proxy
) -> None:
    environ = {"https_proxy": proxy.url, "no_proxy": "example.com,127.0.0.0/8"}
    async with gateway(tmp_path, _url(tls_fake), environ) as run:
        assert (await run.send()).outcome == pb.OUTCOME_SENT
    assert len(tls_fake.calls) == 1
    assert "127.0.0.1:" + str(_port(_url(tls_fake))) not in proxy.access_log()


async def test_a_tenant_may_go_direct_past_the_gateway_s_proxy(
    tmp_path: Path, tls_fake: FakeBraze, proxy: Proxy
) -> None:
    async with gateway(tmp_path, _url(tls_fake), proxy="none", upstream_proxy=proxy.url) as run:
        assert (await run.send()).outcome == pb.OUTCOME_SENT
    assert len(tls_fake.calls) == 1 and not _tunnels(proxy, tls_fake)


async def test_a_tenant_s_own_proxy_is_used(tmp_path: Path, tls_fake: FakeBraze, proxy: Proxy) -> None:
    async with gateway(tmp_path, _url(tls_fake), {"NO_PROXY": "*"}, proxy=proxy.url) as run:
        assert (await run.send()).outcome == pb.OUTCOME_SENT
    assert len(tls_fake.calls) == 1 and len(_tunnels(proxy, tls_fake)) == 1


async def test_plain_http_is_forwarded(tmp_path: Path, plain_fake: FakeBraze, proxy: Proxy) -> None:
    async with gateway(tmp_path, _url(plain_fake), {"HTTP_PROXY": proxy.url}) as run:
        assert (await run.send()).outcome == pb.OUTCOME_SENT
    assert len(plain_fake.calls) == 1
    assert f"POST {_url(plain_fake)}/canvas/trigger/send" in proxy.access_log()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_proxy_credentials_are_sent_to_the_proxy_only_and_never_shown(
    tmp_path: Path,
    tls_fake: FakeBraze,
    plain_fake: FakeBraze,
    auth_proxy: Proxy,
    scheme: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = tls_fake if scheme == "https" else plain_fake
    url = f"http://{USER}:{PASSWORD}@{auth_proxy.address}"
    async with gateway(tmp_path, _url(fake), upstream_proxy=url) as run:
        assert (await run.send()).outcome == pb.OUTCOME_SENT
        exposition = run.exposition()
        secrets = run.gateway.secrets()
    assert len(fake.calls) == 1
    assert f" {USER} " in auth_proxy.access_log()  # squid logs the user it let through
    assert PASSWORD in secrets and redact(f"pw={PASSWORD}", secrets) == "pw=[REDACTED]"
    assert PASSWORD not in caplog.text and PASSWORD not in exposition


async def test_proxy_credentials_never_travel_inside_the_tunnel(tmp_path: Path, auth_proxy: Proxy) -> None:
    """Braze (here a recorder of headers behind TLS) never sees Proxy-Authorization."""
    seen: list[Mapping[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"message": "success", "dispatch_id": "d-1"}, status=201)

    app = web.Application()
    app.router.add_post("/canvas/trigger/send", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_tls(tmp_path)).start()
    try:
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        async with gateway(
            tmp_path, url, upstream_proxy=f"http://{USER}:{PASSWORD}@{auth_proxy.address}"
        ) as run:
            assert (await run.send()).outcome == pb.OUTCOME_SENT
    finally:
        await runner.cleanup()
    (headers,) = seen
    assert "Proxy-Authorization" not in headers and headers["Authorization"] == f"Bearer {KEYS['acme']}"
    assert "TCP_TUNNEL/200" in auth_proxy.access_log()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_wrong_proxy_password(
    tmp_path: Path,
    tls_fake: FakeBraze,
    plain_fake: FakeBraze,
    auth_proxy: Proxy,
    scheme: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CONNECT refused with 407: nothing reached Braze, NOT_ATTEMPTED and retried. Forwarded http:
    the proxy's 407 is a refusal (nothing sent), not retried."""
    caplog.set_level(logging.DEBUG)
    fake = tls_fake if scheme == "https" else plain_fake
    wrong = "wr0ng-pa55word"
    async with gateway(
        tmp_path, _url(fake), upstream_proxy=f"http://{USER}:{wrong}@{auth_proxy.address}"
    ) as run:
        result = await run.send()
        exposition = run.exposition()
    assert not fake.calls
    if scheme == "https":
        assert result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.retryable and result.attempts == 3
        assert result.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "the proxy answered 407 to CONNECT" in result.status_message
    else:
        assert result.outcome == pb.OUTCOME_REJECTED and result.braze.http_status == 407
        assert not result.retryable and result.attempts == 1
    for text in (result.status_message, caplog.text, exposition):
        assert wrong not in text


async def test_connect_refused_by_the_proxy_is_not_sent(tmp_path: Path, tls_fake: FakeBraze) -> None:
    async with squid(deny_ports=[_port(_url(tls_fake))]) as proxy:
        async with gateway(tmp_path, _url(tls_fake), upstream_proxy=proxy.url) as run:
            result = await run.send()
        assert "TCP_DENIED/403" in proxy.access_log()
    assert result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.retryable
    assert "the proxy answered 403 to CONNECT" in result.status_message and not tls_fake.calls


async def test_forwarding_refused_by_the_proxy_is_a_refusal(tmp_path: Path, plain_fake: FakeBraze) -> None:
    async with (
        squid(deny_ports=[_port(_url(plain_fake))]) as proxy,
        gateway(tmp_path, _url(plain_fake), upstream_proxy=proxy.url) as run,
    ):
        result = await run.send()
    assert result.outcome == pb.OUTCOME_REJECTED and result.braze.http_status == 403 and not plain_fake.calls


async def test_proxy_that_cannot_reach_braze(tmp_path: Path, proxy: Proxy) -> None:
    """Nothing listens at Braze's address: squid fails the CONNECT (5xx) - nothing sent, retried;
    forwarded http gets squid's 5xx page, which, like Braze's own 5xx, is UNKNOWN (not retried)."""
    closed = free_port()
    async with gateway(tmp_path, f"https://127.0.0.1:{closed}", upstream_proxy=proxy.url) as run:
        tunnelled = await run.send()
    async with gateway(tmp_path, f"http://127.0.0.1:{closed}", upstream_proxy=proxy.url) as run:
        forwarded = await run.send()
    assert tunnelled.outcome == pb.OUTCOME_NOT_ATTEMPTED and tunnelled.attempts == 3
    assert "to CONNECT" in tunnelled.status_message
    assert forwarded.outcome == pb.OUTCOME_UNKNOWN and forwarded.braze.http_status >= 500
    assert forwarded.attempts == 1 and not forwarded.retryable


async def test_an_unreachable_proxy_is_not_sent(tmp_path: Path, tls_fake: FakeBraze) -> None:
    async with gateway(
        tmp_path, _url(tls_fake), upstream_proxy=f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}"
    ) as run:
        result = await run.send()
    assert (
        result.outcome == pb.OUTCOME_NOT_ATTEMPTED and "ClientProxyConnectionError" in result.status_message
    )
    assert PASSWORD not in result.status_message and not tls_fake.calls


async def test_a_dropped_tunnel_after_sending_is_unknown(
    tmp_path: Path, tls_fake: FakeBraze, proxy: Proxy
) -> None:
    tls_fake.faults.script([Fault.reset()])
    async with gateway(tmp_path, _url(tls_fake), upstream_proxy=proxy.url) as run:
        result = await run.send()
    assert result.outcome == pb.OUTCOME_UNKNOWN and result.attempts == 1 and len(tls_fake.calls) == 1


def test_the_egress_network_policy_example_admits_only_dns_redis_and_the_proxy() -> None:
    k8s = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
    policy = yaml.safe_load((k8s / "egress" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Egress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "canvas-gateway"}
    ports = sorted(
        (port["protocol"], port["port"]) for rule in policy["spec"]["egress"] for port in rule["ports"]
    )
    assert ports == [("TCP", 53), ("TCP", 3128), ("TCP", 6379), ("UDP", 53)]
    assert "egress" not in (k8s / "kustomization.yaml").read_text()  # an example, applied apart


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"HTTPS_PROXY": f"socks5://{USER}:{PASSWORD}@proxy:1080"}, "HTTPS_PROXY must be an http://"),
        ({"http_proxy": f"http://{USER}:{PASSWORD}@proxy:3128/x"}, "http_proxy must be the proxy's base URL"),
        ({"CGW_UPSTREAM_CA_FILE": "/nonexistent/ca.pem"}, "CGW_UPSTREAM_CA_FILE cannot be read"),
    ],
)
def test_check_config_refuses_what_the_boot_would(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variables: dict[str, str], words: str
) -> None:
    (tmp_path / "tenants.toml").write_text(_tenants("https://rest.iad-01.braze.com"))
    for name in [name for name in os.environ if name.startswith("CGW_") or name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    for name, value in {"CGW_TENANTS_FILE": str(tmp_path / "tenants.toml"), **variables}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main(["--check-config"])
    assert words in str(exited.value.code) and PASSWORD not in str(exited.value.code)


async def test_a_gateway_process_never_logs_the_proxy_s_password(
    tmp_path: Path, tls_fake: FakeBraze, auth_proxy: Proxy
) -> None:
    """A real process (its log filter on), at DEBUG, with the credentials in HTTPS_PROXY: one call
    through and one refused with another password in the tenants file; neither password is logged."""
    wrong = "wr0ng-pa55word"
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        _tenants(_url(tls_fake))
        + "\n[tenants.globex]\n"
        + f'token_sha256 = ["{token_digest(TOKENS["globex"])}"]\n'
        + f'braze_rest_url = "{_url(tls_fake)}"\n'
        + f'braze_api_key = "{KEYS["globex"]}"\n'
        + f'proxy = "http://{USER}:{wrong}@{auth_proxy.address}"\n'
    )
    log = tmp_path / "gateway.log"
    async with aiohttp.ClientSession() as session:
        replica = await start_logged_replica(
            tenants,
            session,
            log,
            {
                "HTTPS_PROXY": f"http://{USER}:{PASSWORD}@{auth_proxy.address}",
                "CGW_UPSTREAM_CA_FILE": str(tmp_path / "cert.pem"),
                "CGW_LOG_LEVEL": "DEBUG",
            },
        )
        try:
            async with grpc.aio.insecure_channel(replica.address) as channel:
                run = Run(replica, pb_grpc.CanvasGatewayServiceStub(channel))
                assert (await run.send()).outcome == pb.OUTCOME_SENT
                refused = await run.send("globex")
                assert refused.outcome == pb.OUTCOME_NOT_ATTEMPTED
        finally:
            await stop_process(replica.process)
    text = log.read_text()
    assert "407" in text  # the refusal was logged...
    assert PASSWORD not in text and wrong not in text  # ...without either password


async def test_the_demo_s_embedded_fake_is_never_reached_through_a_proxy() -> None:
    """The machine's HTTP_PROXY names a proxy that is down: the demo still sends to its own fake."""
    settings = Settings.from_env({}, demo=True, demo_braze_port=0, grpc_address="127.0.0.1:0", **LOCAL)
    down = f"http://127.0.0.1:{free_port()}"
    started = await Gateway.start(settings, environ={"HTTP_PROXY": down, "HTTPS_PROXY": down})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{started.port}") as channel:
            response = await pb_grpc.CanvasGatewayServiceStub(channel).Send(
                pb.SendRequest(trigger=trigger_from_json(BODY)),
                metadata=(("authorization", f"Bearer {DEMO_TOKEN}"),),
                timeout=30,
            )
    finally:
        await started.stop(grace=0)
    assert [result.outcome for result in response.results] == [pb.OUTCOME_SENT]
