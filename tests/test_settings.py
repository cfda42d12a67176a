"""Settings: defaults, a TOML file, environment overrides, and failing fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import Settings
from support import SECRET_PIECES, UNESCAPED_PASSWORDS


def test_environment_overrides_file_overrides_defaults(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('request_concurrency = 4\nupstream_timeout_seconds = 7\ntenants_file = "t.toml"\n')
    settings = Settings.from_env({"CGW_CONFIG_FILE": str(config), "CGW_REQUEST_CONCURRENCY": "6"})
    assert settings.request_concurrency == 6
    assert settings.upstream_timeout_seconds == 7.0
    assert settings.tenants_file == "t.toml"
    assert settings.unary_max_recipients == 10_000


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
    assert Settings.from_env({"CGW_DEMO": "true"}).demo is True


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
    assert Settings.from_env({"CGW_DEMO": "1", "CGW_REDIS_URL": url}).redis_url == url
