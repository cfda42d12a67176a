"""The tenants file: token digests, key sources, URL rules; errors never show a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.rate_budget import WorkspacePolicy
from canvas_gateway_server.tenants import FileTenantDirectory, load_tenants, token_digest

DIGEST = token_digest("caller-token")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


def entry(
    name: str = "acme",
    *,
    url: str = "https://rest.iad-01.braze.com",
    key: str = 'braze_api_key = "k-1"',
    extra: str = "",
    digest: str = DIGEST,
) -> str:
    return f'[tenants.{name}]\ntoken_sha256 = ["{digest}"]\nbraze_rest_url = "{url}"\n{key}\n{extra}\n'


def test_a_token_resolves_to_its_tenant_only(tmp_path: Path) -> None:
    other = token_digest("other-token")
    path = write(tmp_path, entry() + entry("beta", key='braze_api_key = "k-2"', digest=other))
    tenants = load_tenants(path, {})
    acme = tenants.authenticate("caller-token")
    beta = tenants.authenticate("other-token")
    assert acme is not None and acme.id == "acme" and acme.braze_api_key == "k-1"
    assert beta is not None and beta.id == "beta" and beta.braze_api_key == "k-2"
    assert tenants.authenticate("caller-token ") is None
    assert tenants.authenticate("") is None
    assert "k-1" not in repr(acme)
    assert tenants.secrets() == {"k-1", "k-2"}
    assert acme.allow_broadcast is False  # default: no broadcast


def test_key_from_env_and_file(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("k-from-file\n")
    text = entry(key='braze_api_key_env = "ACME_KEY"') + entry(
        "beta", key='braze_api_key_file = "key.txt"', digest=token_digest("b")
    )
    tenants = load_tenants(write(tmp_path, text), {"ACME_KEY": "k-from-env"})
    assert tenants.secrets() == {"k-from-env", "k-from-file"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (entry(url="http://rest.iad-01.braze.com"), "must be https"),
        (entry(url="ftp://example.com"), "http(s) base URL"),
        (entry(url="https://user:pw@rest.iad-01.braze.com"), "must not carry credentials"),
        (entry(key=""), "exactly one of"),
        (entry(key='braze_api_key = "a"\nbraze_api_key_env = "B"'), "exactly one of"),
        (entry(key='braze_api_key_env = "MISSING"'), "MISSING is unset"),
        (entry(key='braze_api_key_file = "nope.txt"'), "cannot read braze_api_key_file"),
        (entry(key='braze_api_key = "secret with space"'), "spaces or quotes"),
        (entry(digest="abc"), "token_sha256"),
        (entry(extra="colour = 1"), "unknown fields colour"),
        (entry(extra="max_concurrent_batches = 0"), "max_concurrent_batches"),
        (entry(extra='allow_broadcast = "yes"'), "allow_broadcast"),
        (entry('"Bad Name"'), "ids are"),
        (entry() + entry("beta"), "used twice"),
        ("", "expected one or more"),
        ("[tenants.acme\n", "cannot read tenants file"),
    ],
)
def test_bad_files_fail_with_a_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_tenants(write(tmp_path, text), {})
    assert expected in str(caught.value)
    assert "secret with space" not in str(caught.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9700", "http://localhost:9700", "http://[::1]:9700"])
def test_plain_http_is_allowed_to_loopback(tmp_path: Path, url: str) -> None:
    tenants = load_tenants(write(tmp_path, entry(url=url)), {})
    tenant = tenants.authenticate("caller-token")
    assert tenant is not None and tenant.braze_rest_url == url


def test_plain_http_elsewhere_needs_explicit_consent(tmp_path: Path) -> None:
    text = entry(url="http://braze-proxy.internal:8080/", extra="allow_insecure_http = true")
    tenant = load_tenants(write(tmp_path, text), {}).authenticate("caller-token")
    assert tenant is not None and tenant.braze_rest_url == "http://braze-proxy.internal:8080"


def test_reload_swaps_tenants_and_a_bad_file_keeps_the_old_ones(tmp_path: Path) -> None:
    path = write(tmp_path, entry())
    directory = FileTenantDirectory(path, {})
    path.write_text(entry(digest=token_digest("rotated-token")))
    directory.reload()
    assert directory.authenticate("caller-token") is None
    assert directory.authenticate("rotated-token") is not None
    path.write_text("not toml [")
    with pytest.raises(ConfigError):
        directory.reload()
    assert directory.authenticate("rotated-token") is not None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [("", "context"), ('context_name = "canvas_entry_properties"', "canvas_entry_properties")],
)
def test_the_context_name_a_workspace_takes(tmp_path: Path, extra: str, expected: str) -> None:
    tenant = load_tenants(write(tmp_path, entry(extra=extra)), {}).authenticate("caller-token")
    assert tenant is not None and tenant.context_name == expected


def test_an_unknown_context_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tenant 'acme': context_name must be one of"):
        load_tenants(write(tmp_path, entry(extra='context_name = "ctx"')), {})


@pytest.mark.parametrize(("extra", "expected"), [("", False), ("propagate_trace = true", True)])
def test_trace_propagation_to_braze_is_opt_in(tmp_path: Path, extra: str, expected: bool) -> None:
    tenant = load_tenants(write(tmp_path, entry(extra=extra)), {}).authenticate("caller-token")
    assert tenant is not None and tenant.propagate_trace is expected


def test_propagate_trace_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tenant 'acme': propagate_trace must be true or false"):
        load_tenants(write(tmp_path, entry(extra='propagate_trace = "yes"')), {})


def test_a_tenants_workspace_is_named_or_derived_without_its_key(tmp_path: Path) -> None:
    def table(tenant: str, url: str, key: str, extra: str = "") -> str:
        return (
            f'[tenants.{tenant}]\ntoken_sha256 = ["{token_digest(tenant)}"]\nbraze_rest_url = "{url}"\n'
            f'braze_api_key = "{key}"\n{extra}\n'
        )

    url = "https://rest.iad-01.braze.com"
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        "[workspaces.shop]\nceiling = 0.8\nreserve = 500\ntransactional_reserve = 0.2\n\n"
        + table("a", url, "secret-key-1", 'workspace = "shop"\nlane = "bulk"')
        + table("b", url + "/", "secret-key-1")
        + table("c", url, "secret-key-1")
        + table("d", url, "secret-key-2")
    )
    directory = load_tenants(tenants, {})
    a, b, c, d = (directory.authenticate(tenant) for tenant in "abcd")
    assert a is not None and b is not None and c is not None and d is not None
    policy = WorkspacePolicy(ceiling_share=0.8, reserve_calls=500, transactional_share=0.2)
    assert (a.workspace_name, a.policy, a.lane) == ("shop", policy, "bulk")
    assert b.workspace_name.startswith("auto-") and "secret" not in b.workspace_name
    assert b.workspace_name == c.workspace_name != d.workspace_name  # the same URL and key: one workspace
    assert (b.policy, b.lane) == (WorkspacePolicy(), "auto")
    assert "secret" not in repr(a)


@pytest.mark.parametrize(
    ("workspace", "message"),
    [
        ("ceiling = 0", "ceiling must be a whole number of calls per window or a share"),
        ("ceiling = 1.5", "ceiling must be"),
        ("reserve = 1.0", "reserve must be"),
        ("reserve = -1", "reserve must be"),
        ('reserve = "10%"', "reserve must be"),
        ("transactional_reserve = true", "transactional_reserve must be"),
        ("reserve = 0.6\ntransactional_reserve = 0.5", "leave bulk calls nothing"),
        ("ceiling = 0.2\ntransactional_reserve = 0.2", "leave bulk calls nothing"),
        ("burst = 3", "unknown fields burst"),
    ],
)
def test_a_bad_workspace_policy_is_refused(workspace: str, message: str, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f"[workspaces.shop]\n{workspace}\n\n[tenants.a]\n" + _entry_toml())
    with pytest.raises(ConfigError, match=message):
        load_tenants(tenants, {})


def _entry_toml(extra: str = "") -> str:
    return (
        f'token_sha256 = ["{"1" * 64}"]\nbraze_rest_url = "https://rest.iad-01.braze.com"\n'
        f'braze_api_key = "k"\n{extra}'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tenants.a]\n" + _entry_toml('workspace = "nowhere"\n'), "workspace must name a"),
        ("[tenants.a]\n" + _entry_toml('lane = "urgent"\n'), "lane must be one of auto, transactional, bulk"),
        ("[workspaces.auto-x]\n\n[tenants.a]\n" + _entry_toml(), "not starting auto-"),
        ("[workspaces.shop]\nx = 1\n[workspaces.b]\n\n[tenants.a]\n" + _entry_toml(), "unknown fields x"),
        ("workspaces = 3\n\n[tenants.a]\n" + _entry_toml(), "workspaces must be"),
        ("[workspaces]\nshop = 3\n\n[tenants.a]\n" + _entry_toml(), "must be a table"),
        ("[other]\n\n[tenants.a]\n" + _entry_toml(), "and nothing else"),
    ],
)
def test_a_tenant_names_a_known_workspace_and_lane(text: str, message: str, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_tenants(tenants, {})


@pytest.mark.parametrize(("extra", "expected"), [("", False), ("retry_502 = true", True)])
def test_retrying_a_502_is_opt_in(tmp_path: Path, extra: str, expected: bool) -> None:
    tenant = load_tenants(write(tmp_path, entry(extra=extra)), {}).authenticate("caller-token")
    assert tenant is not None and tenant.retry_502 is expected


def test_retry_502_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tenant 'acme': retry_502 must be true or false"):
        load_tenants(write(tmp_path, entry(extra='retry_502 = "yes"')), {})
