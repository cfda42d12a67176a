"""Settings: defaults, a TOML file, environment overrides, and failing fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import (
    AT_LEAST_ONE,
    SETTINGS,
    Calls,
    Grpc,
    Retry,
    Settings,
    State,
    Telemetry,
    Tenants,
    Upstream,
    WorkerRole,
)
from support import SECRET_PIECES, UNESCAPED_PASSWORDS


def test_environment_overrides_file_overrides_defaults(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('request_concurrency = 4\nupstream_timeout_seconds = 7\ntenants_file = "t.toml"\n')
    settings = Settings.from_env({"CGW_CONFIG_FILE": str(config), "CGW_REQUEST_CONCURRENCY": "6"})
    assert settings.sending.request_concurrency == 6
    assert settings.upstream.timeout_seconds == 7.0
    assert settings.tenants.file == "t.toml"
    assert settings.sending.unary_max_recipients == 10_000


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "CGW_TENANTS_FILE"),
        ({"CGW_DEMO": "maybe"}, "CGW_DEMO must be a bool"),
        ({"CGW_DEMO": "1", "CGW_MAX_ATTEMPTS": "0"}, "CGW_MAX_ATTEMPTS must be at least 1"),
        ({"CGW_DEMO": "1", "CGW_REQUEST_CONCURRENCY": "many"}, "must be a int"),
        ({"CGW_DEMO": "1", "CGW_UPSTREAM_TIMEOUT_SECONDS": "-1"}, "must be positive"),
        ({"CGW_CONFIG_FILE": "/nonexistent/gateway.toml"}, "cannot read config file"),
        ({"CGW_DEMO": "1", "CGW_LOG_LEVEL": "verbose"}, "CGW_LOG_LEVEL must be"),
        ({"CGW_DEMO": "1", "CGW_SHUTDOWN_GRACE_SECONDS": "-5"}, "must not be negative"),
        ({"CGW_DEMO": "1", "CGW_GRPC_ADDRESS": "bogus"}, "must be host:port"),
        (
            {"CGW_DEMO": "1", "CGW_GRPC_ADRESS": "127.0.0.1:1"},
            "unknown settings in the environment: CGW_GRPC_ADRESS",
        ),
    ],
)
def test_bad_settings_fail_at_boot(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)
    assert expected in str(caught.value)


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("demo = true\nrequest_concurency = 4\n")
    with pytest.raises(ConfigError, match="unknown settings: request_concurency"):
        Settings.from_env({"CGW_CONFIG_FILE": str(config)})


def test_demo_flag_from_environment() -> None:
    assert Settings.from_env({"CGW_DEMO": "true"}).tenants.demo is True


@pytest.mark.parametrize("url", UNESCAPED_PASSWORDS)
def test_a_redis_password_with_an_unescaped_delimiter_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CGW_DEMO": "1", "CGW_REDIS_URL": url})
    message = str(caught.value)
    assert "CGW_REDIS_URL" in message and "percent-encode" in message
    assert not any(piece in message for piece in SECRET_PIECES)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:6379", "must start with redis://, rediss:// or unix://"),
        ("redis://:Qz9Xv7k@127.0.0.1:99999/0", "its port is not a number"),
        ("redis://:Qz9Xv7k@127.0.0.1:Jw3/0", "its port is not a number"),
        ("redis://:Qz9Xv7k@127.0.0.1:6379/Jw3", "its path must be a database number"),
    ],
)
def test_a_redis_url_that_would_not_parse_as_meant_is_refused(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"CGW_DEMO": "1", "CGW_REDIS_URL": url})
    assert expected in str(caught.value) and "CGW_REDIS_URL" in str(caught.value)
    assert not any(piece in str(caught.value) for piece in SECRET_PIECES)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1",
        "redis://:Qz9%2FXv7k%23Jw3%3F@127.0.0.1:6379/0",  # the same characters, percent-encoded
        "rediss://default:Qz9:Xv7k@redis.internal:6380/2",
        "redis://:p@ss@127.0.0.1:6379/",  # '@' in a password: the last one ends it
        "unix:///run/redis.sock?db=1",
        "unix://:Qz9@/run/redis.sock",
    ],
)
def test_redis_urls_that_parse_as_meant_are_taken(url: str) -> None:
    assert Settings.from_env({"CGW_DEMO": "1", "CGW_REDIS_URL": url}).state.redis_url == url


def test_every_flat_name_reaches_its_group_field_from_the_environment_the_file_and_overrides(
    tmp_path: Path,
) -> None:
    """Each of the three sources, for every setting: the value lands in its group's field."""
    for name, where in SETTINGS.items():
        if isinstance(where.default, bool):
            value: object = not where.default
        elif isinstance(where.default, (int, float)):
            value = where.default + 1
        else:
            continue  # strings are checked by shape (addresses, URLs, levels), each with its own test
        config = tmp_path / f"{name}.toml"
        config.write_text(f"{name} = {str(value).lower()}\n")
        extra = {} if name == "demo" else {"demo": True}
        for settings in (
            Settings.from_env(
                {f"CGW_{name.upper()}": str(value), **({} if name == "demo" else {"CGW_DEMO": "1"})}
            ),
            Settings.from_env({"CGW_CONFIG_FILE": str(config)}, **extra),
            Settings.from_env({}, **{name: value, **extra}),
        ):
            assert getattr(getattr(settings, where.group), where.field) == value, name


def test_a_group_owns_its_defaults_and_checks_without_the_rest() -> None:
    assert Upstream().pool_size == SETTINGS["upstream_pool_size"].default == 100
    assert Grpc(max_connections=7).max_connections == 7
    with pytest.raises(ConfigError, match="CGW_MAX_STREAMS_PER_TENANT must be at least 1"):
        Calls(max_streams_per_tenant=0)
    with pytest.raises(ConfigError, match="CGW_IDEMPOTENCY_LEASE_SECONDS must be positive"):
        State(idempotency_lease_seconds=0.0)
    with pytest.raises(ConfigError, match="CGW_BREAKER_FAILURES must not be negative"):
        Retry(breaker_failures=-1)
    with pytest.raises(ConfigError, match="CGW_REDIS_FAILURE must be open or closed"):
        State(redis_failure="sometimes")
    with pytest.raises(ConfigError, match="both set"):
        Tenants(file="t.toml", demo=True)
    with pytest.raises(ConfigError, match="CGW_DEMO_BRAZE_PORT must be a port number"):
        Tenants(demo=True, demo_braze_port=70_000)
    with pytest.raises(ConfigError, match="CGW_LOG_FORMAT must be text or json"):
        Telemetry(log_format="xml")
    with pytest.raises(ConfigError, match="setting max_streams must be a int"):
        Settings.from_env({"CGW_DEMO": "1"}, max_streams=1.5)  # a TOML value of the wrong type
    assert AT_LEAST_ONE.holds(1) and not AT_LEAST_ONE.holds(0)


def test_the_redis_url_is_left_out_of_the_repr() -> None:
    settings = Settings.from_env({"CGW_DEMO": "1", "CGW_REDIS_URL": "redis://:Qz9Xv7k@127.0.0.1:6379/0"})
    assert "Qz9Xv7k" not in repr(settings)


def test_the_worker_role_is_the_supervisor_s_not_a_setting() -> None:
    assert WorkerRole.from_env({}) is None
    assert WorkerRole.from_env({"CGW_WORKER_INDEX": "-1"}) is None
    role = WorkerRole(2, "/run/x")
    assert WorkerRole.from_env(role.environ()) == role
    assert set(role.environ()) == {"CGW_WORKER_INDEX", "CGW_WORKER_DIR"}
    assert not {"worker_index", "worker_dir"} & set(SETTINGS)
    # The supervisor's variables pass the check of unknown CGW_* names, and change no setting.
    assert Settings.from_env({"CGW_DEMO": "1", **role.environ()}) == Settings.from_env({"CGW_DEMO": "1"})
    with pytest.raises(ConfigError, match="CGW_WORKER_INDEX is set by the supervisor, with CGW_WORKER_DIR"):
        WorkerRole.from_env({"CGW_WORKER_INDEX": "0"})
    with pytest.raises(ConfigError, match="CGW_WORKER_INDEX must be a int"):
        WorkerRole.from_env({"CGW_WORKER_INDEX": "first", "CGW_WORKER_DIR": "/run/x"})
    with pytest.raises(ConfigError, match="unknown settings: worker_index"):
        Settings.from_env({"CGW_DEMO": "1"}, worker_index=0)
