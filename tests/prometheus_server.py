"""A real Prometheus server on 127.0.0.1 for tests, and a small client for its HTTP API.

`running()` starts the `prometheus` binary with a fresh TSDB in a temporary directory,
scraping one target every second and evaluating the given rule files every second, and
stops it whatever happens. The binary is `$PROMETHEUS_BIN`, else `prometheus` on PATH; when
there is none the test fails (it is not skipped) and says how to install it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import free_port

JOB = "canvas-gateway"
"""The job name of deploy/prometheus/prometheus.yml, which alerts.yml's `up{job=...}` expects."""
START_SECONDS = 20.0
"""How long Prometheus may take to answer /-/ready."""
STOP_SECONDS = 10.0
"""How long Prometheus may take to exit on SIGTERM before it is killed."""


def binary() -> str:
    """The prometheus binary, or a test failure naming the install script."""
    found = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not found:
        pytest.fail(
            "the `prometheus` binary is not on PATH (nor in $PROMETHEUS_BIN): "
            "run .ci/prometheus-install (as root) to install Debian's prometheus package",
            pytrace=False,
        )
    return found


def has_data(series: Sequence[dict[str, Any]]) -> bool:
    """True when a query_range answer holds at least one finite value."""
    return any(math.isfinite(float(v)) for s in series for _, v in s.get("values", ()))


@dataclass
class Prometheus:
    url: str
    session: aiohttp.ClientSession
    process: asyncio.subprocess.Process
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        async with self.session.get(self.url + path, params=params) as reply:
            body = await reply.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body.get('error', body)}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the current time; the result's vector."""
        data = await self._get("/api/v1/query", {"query": expr})
        result: list[dict[str, Any]] = data["result"]
        return result

    async def query_range(
        self, expr: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)}
        data = await self._get("/api/v1/query_range", params)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, as /api/v1/rules reports it (`name`, `query`, `health`, ...)."""
        data = await self._get("/api/v1/rules")
        return [rule for group in data["groups"] for rule in group["rules"]]

    async def wait_for(self, expr: str, what: str, within: float = 15.0) -> list[dict[str, Any]]:
        """Poll an instant query until it returns a series; fail after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            found = await self.query(expr)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus never had {what} ({expr}) within {within:.0f}s")
            if self.process.returncode is not None:
                raise AssertionError(f"Prometheus exited ({self.process.returncode}):\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def wait_for_scrape_after(self, moment: float, within: float = 15.0) -> None:
        """Wait until Prometheus holds a scrape of the target that began after `moment`
        (epoch seconds): everything the target counted before then is stored."""
        await self.wait_for(
            f'timestamp(up{{job="{JOB}"}}) > {moment:.3f}', f"a scrape after {moment:.3f}", within
        )


def config(target: str, rule_files: Sequence[Path], interval: float) -> dict[str, Any]:
    """Prometheus's configuration: YAML is a superset of JSON, so this is written as JSON."""
    return {
        "global": {"scrape_interval": f"{interval:g}s", "evaluation_interval": f"{interval:g}s"},
        "rule_files": [str(path.resolve()) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": JOB,
                "scrape_timeout": f"{interval:g}s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }


@asynccontextmanager
async def running(
    workdir: Path, target: str, rule_files: Sequence[Path], interval: float = 1.0
) -> AsyncIterator[Prometheus]:
    """Prometheus on 127.0.0.1 scraping `target` (host:port) every `interval` seconds."""
    executable = binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config(target, rule_files, interval), indent=2))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for attempt in range(3):  # another process may take the free port before Prometheus binds it
            port = free_port()
            log = workdir / f"prometheus-{attempt}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    executable,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                )
            server = Prometheus(f"http://127.0.0.1:{port}", session, process, log)
            try:
                if await _ready(server):
                    yield server
                    return
            finally:
                await _stop(process)
            if "address already in use" not in server.log_tail():
                break
        raise AssertionError(f"Prometheus did not start:\n{server.log_tail()}")


async def _ready(server: Prometheus) -> bool:
    """Wait for /-/ready; False when the process exits first. Raises after START_SECONDS."""
    deadline = time.monotonic() + START_SECONDS
    while server.process.returncode is None:
        try:
            async with server.session.get(server.url + "/-/ready") as reply:
                if reply.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(
                f"Prometheus was not ready within {START_SECONDS:.0f}s:\n{server.log_tail()}"
            )
        await asyncio.sleep(0.1)
    return False


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
