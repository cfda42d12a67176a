"""The server's command line: --check-config, --version, and refusing demo mode beside tenants."""

from __future__ import annotations

from pathlib import Path

import pytest
from canvas_gateway_server import __version__
from canvas_gateway_server.__main__ import main
from support import KEYS, SECRET_PIECES, UNESCAPED_PASSWORDS, free_port, tenants_toml


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in ("CGW_DEMO", "CGW_TENANTS_FILE", "CGW_CONFIG_FILE", "CGW_REDIS_URL", "ACME_BRAZE_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_check_config_lists_the_tenants_it_would_serve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml("https://rest.iad-01.braze.com"))
    _env(monkeypatch, CGW_TENANTS_FILE=str(tenants), ACME_BRAZE_KEY=KEYS["acme"])
    main(["--check-config"])
    assert capsys.readouterr().out == "configuration valid: 3 tenant(s): acme, globex, initech\n"


def test_check_config_fails_with_the_reason_and_no_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml("https://rest.iad-01.braze.com"))
    _env(monkeypatch, CGW_TENANTS_FILE=str(tenants))  # acme's key variable is missing
    with pytest.raises(SystemExit) as exited:
        main(["--check-config"])
    reason = str(exited.value.code)
    assert reason.startswith("canvas-gateway: tenant 'acme'") and "ACME_BRAZE_KEY" in reason
    assert not any(key in reason for key in KEYS.values())
    assert capsys.readouterr().out == ""


def test_demo_mode_beside_a_tenants_file_refuses_to_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml("https://rest.iad-01.braze.com"))
    _env(monkeypatch, CGW_TENANTS_FILE=str(tenants), CGW_DEMO="true")
    with pytest.raises(SystemExit) as exited:
        main(["--check-config"])
    assert "CGW_DEMO and CGW_TENANTS_FILE are both set" in str(exited.value.code)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"canvas-gateway-server {__version__}\n"


@pytest.mark.parametrize(
    "url",
    [*UNESCAPED_PASSWORDS, "redis://:Qz9Xv7k@127.0.0.1:6379/0?Jw3=1", "redis://:Qz9@h/0?socket_timeout=Jw3"],
)
def test_check_config_refuses_a_redis_url_that_would_not_parse_and_never_quotes_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml("https://rest.iad-01.braze.com"))
    _env(monkeypatch, CGW_TENANTS_FILE=str(tenants), ACME_BRAZE_KEY=KEYS["acme"], CGW_REDIS_URL=url)
    with pytest.raises(SystemExit) as exited:
        main(["--check-config"])
    reason = str(exited.value.code)  # what sys.exit prints, with exit status 1
    assert reason.startswith("canvas-gateway: CGW_REDIS_URL ")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert not any(piece in text for piece in SECRET_PIECES for text in (reason, captured.out, captured.err))


def test_accept_lost_keys_needs_redis_and_never_shows_its_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--accept-lost-keys (docs/operations.md: where keys live; tested against Redis in test_idempotency)."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml("https://rest.iad-01.braze.com"))
    _env(monkeypatch, CGW_TENANTS_FILE=str(tenants), ACME_BRAZE_KEY=KEYS["acme"])
    monkeypatch.delenv("CGW_REDIS_URL", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["--accept-lost-keys"])
    assert "--accept-lost-keys needs CGW_REDIS_URL" in str(exited.value.code)

    url = f"redis://:pass-word-1@127.0.0.1:{free_port()}/0"  # nothing listens there
    monkeypatch.setenv("CGW_REDIS_URL", url)
    with pytest.raises(SystemExit) as exited:
        main(["--accept-lost-keys"])
    reason = str(exited.value.code)
    assert "Redis (CGW_REDIS_URL) did not answer" in reason and "pass-word-1" not in reason


def test_check_config_refuses_an_exporter_the_gateway_cannot_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml("https://rest.iad-01.braze.com"))
    _env(monkeypatch, CGW_TENANTS_FILE=str(tenants), ACME_BRAZE_KEY=KEYS["acme"])
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(SystemExit) as exited:
        main(["--check-config"])
    assert str(exited.value.code) == (
        "canvas-gateway: OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' unsupported; use http/protobuf"
    )
    assert capsys.readouterr().out == ""
