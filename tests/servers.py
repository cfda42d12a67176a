"""Real Redis, HAProxy and gateway processes on 127.0.0.1 for tests and benchmarks (issue 11: scale-out).

`redis_server()` starts Debian's `redis-server` on a free port with nothing persisted, and can stop,
start and restart it on the same port. `haproxy(backends)` starts `haproxy` in the foreground with
the deployment's own config, deploy/haproxy/haproxy.cfg, its addresses given through the
environment variables that file documents, and returns once HAProxy accepts connections and
reports every backend UP. Both stop their process whatever happens.

The binaries are `$REDIS_SERVER_BIN` / `$HAPROXY_BIN`, else found on PATH; when one is missing a
RuntimeError names the install script (`.ci/servers-install`, or `make servers-install`).

`squid()` starts Debian's `squid` (`$SQUID_BIN`, else on PATH or in /usr/sbin) as a forward proxy on
a free port of 127.0.0.1 that only reaches 127.0.0.1, caches nothing, keeps its files in a temporary
folder, and optionally asks for a user and password (basic_ncsa_auth, an MD5-crypt password file).

`jaeger()` starts Jaeger v2 (`$JAEGER_BIN`, else `jaeger` beside the running Python, where
`make jaeger-install` builds it) with tests/jaeger/config.yaml: an OTLP/HTTP receiver and the query
API on free ports of 127.0.0.1, traces kept in memory; `Jaeger.trace(id)` asks the query API.

`start_replica(tenants, session)` starts a gateway process (`python -m canvas_gateway_server`) on
free ports and returns once its /readyz answers.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, gateway_env

ROOT = Path(__file__).resolve().parents[1]
JAEGER_CONFIG = ROOT / "tests" / "jaeger" / "config.yaml"
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
MAX_BACKENDS = 3
"""Server lines in HAProxy's config: CGW_BACKEND_1 .. CGW_BACKEND_3."""
START_SECONDS = 15.0
"""How long a server may take to answer (Redis: PING; HAProxy: its port and every backend UP)."""
STOP_SECONDS = 10.0
"""How long a server may take to exit on SIGTERM before it is killed."""


def binary(name: str, variable: str) -> str:
    found = os.environ.get(variable) or shutil.which(name)
    if not found:
        raise RuntimeError(
            f"the `{name}` binary is not on PATH (nor in ${variable}): run .ci/servers-install "
            "(as root, or `make servers-install`) to install Debian's redis-server and haproxy packages"
        )
    return found


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


async def stop_process(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    """Signal a process and wait for it; kill it if it outlives STOP_SECONDS. Its exit code."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            await asyncio.wait_for(process.wait(), STOP_SECONDS)
        except TimeoutError:
            with suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


@dataclass
class RedisServer:
    """One redis-server on 127.0.0.1:`port`, storing nothing on disk; `directory` holds its log."""

    port: int
    directory: Path
    persistent: bool = False
    """Write every change to an append-only file (fsync always) in `directory`, as production
    should: a restart then keeps what was written."""
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    async def start(self) -> None:
        """Start it (on the same port as before) and wait until it answers PING."""
        if self.process is not None and self.process.returncode is None:
            raise RuntimeError(f"redis-server is already running on port {self.port}")
        self.process = await asyncio.create_subprocess_exec(
            binary("redis-server", "REDIS_SERVER_BIN"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "always",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--daemonize", "no",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_SECONDS
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"redis-server exited ({self.process.returncode}):\n{tail(self.log)}")
                try:
                    if await client.ping():
                        return
                except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    await self.stop()
                    raise RuntimeError(f"redis-server never answered PING:\n{tail(self.log)}")
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Stop it (SIGTERM; killed if it takes too long). Unless persistent, nothing was saved."""
        if self.process is not None:
            await stop_process(self.process)

    async def restart(self) -> None:
        """A Redis restart: stop, then start again on the same port (empty, unless persistent)."""
        await self.stop()
        await self.start()


@asynccontextmanager
async def redis_server(persistent: bool = False) -> AsyncIterator[RedisServer]:
    """A redis-server on a free 127.0.0.1 port, answering PING; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="cgw-redis-") as directory:
        server = RedisServer(free_port(), Path(directory), persistent)
        try:
            await server.start()
            yield server
        finally:
            await server.stop()


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def haproxy_environment(
    bind: str, backends: Sequence[tuple[str, str]], admin_bind: str | None = None
) -> dict[str, str]:
    """deploy/haproxy/haproxy.cfg's variables for `backends`, (gRPC address, admin address) pairs."""
    if not 1 <= len(backends) <= MAX_BACKENDS:
        raise ValueError(f"haproxy.cfg takes 1 to {MAX_BACKENDS} backends, not {len(backends)}")
    env = {"CGW_LB_BIND": bind}
    if admin_bind is not None:
        env["CGW_LB_ADMIN_BIND"] = admin_bind
    for number, (grpc_address, admin_address) in enumerate(backends, start=1):
        admin_host, admin_port = split_address(admin_address)
        if admin_host != split_address(grpc_address)[0]:
            raise ValueError(f"the config checks the admin port on the gRPC host: {backends}")
        env[f"CGW_BACKEND_{number}"] = grpc_address
        env[f"CGW_BACKEND_{number}_ADMIN_PORT"] = str(admin_port)
    return env


@dataclass
class Balancer:
    """A running HAProxy: callers use `address`; `admin` serves its stats, metrics and /healthz."""

    address: str
    admin: str
    process: asyncio.subprocess.Process
    log: Path
    session: aiohttp.ClientSession = field(repr=False)

    async def stats(self) -> list[dict[str, str]]:
        """HAProxy's stats CSV (/stats;csv): one row per frontend, backend and server."""
        async with self.session.get(f"http://{self.admin}/stats;csv") as reply:
            reply.raise_for_status()
            text = (await reply.text()).lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    async def servers(self) -> dict[str, str]:
        """Each backend server's state as HAProxy sees it: "UP", "DOWN", "UP 1/2", ..."""
        return {
            row["svname"]: row["status"]
            for row in await self.stats()
            if row["pxname"] == "gateways" and row["svname"] != "BACKEND"
        }

    async def frontend_connections(self) -> int:
        """Connections the gRPC frontend has accepted so far."""
        (row,) = [r for r in await self.stats() if r["pxname"] == "grpc" and r["svname"] == "FRONTEND"]
        return int(row["conn_tot"])

    async def wait_for(self, states: Mapping[str, str], within: float = START_SECONDS) -> None:
        """Wait until every named server is in its state (e.g. {"gateway-1": "DOWN"})."""
        deadline = time.monotonic() + within
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"haproxy exited ({self.process.returncode}):\n{tail(self.log)}")
            seen: dict[str, str] = {}
            with suppress(aiohttp.ClientError, OSError):
                seen = await self.servers()
            if all(seen.get(name) == state for name, state in states.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy's servers are {seen}, not {dict(states)}:\n{tail(self.log)}")
            await asyncio.sleep(0.05)


async def wait_for_port(
    address: str, process: asyncio.subprocess.Process, log: Path, name: str = "haproxy"
) -> None:
    host, port = split_address(address)
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"{name} exited ({process.returncode}):\n{tail(log)}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} never accepted on {address}:\n{tail(log)}") from None
            await asyncio.sleep(0.02)
        else:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
            return


@asynccontextmanager
async def haproxy(backends: Sequence[tuple[str, str]]) -> AsyncIterator[Balancer]:
    """HAProxy with deploy/haproxy/haproxy.cfg in front of `backends`, (gRPC address, admin
    address) pairs of gateways on 127.0.0.1; yields once it accepts and every backend is UP
    (its /readyz answered twice), and stops it on exit. Its log (stdout) is `Balancer.log`."""
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**os.environ, **haproxy_environment(address, backends, admin)}
    with tempfile.TemporaryDirectory(prefix="cgw-haproxy-") as directory:
        log = Path(directory) / "haproxy.log"
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                binary("haproxy", "HAPROXY_BIN"),
                "-db",  # foreground, no daemon, no master process: SIGTERM stops it
                "-f", str(HAPROXY_CONFIG),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                balancer = Balancer(address, admin, process, log, session)
                await wait_for_port(address, process, log)
                await wait_for_port(admin, process, log)
                await balancer.wait_for({f"gateway-{n}": "UP" for n in range(1, len(backends) + 1)})
                yield balancer
        finally:
            await stop_process(process)


SQUID_AUTH_HELPER = Path("/usr/lib/squid/basic_ncsa_auth")


@dataclass
class Proxy:
    """A running squid: callers use `url`; `access_log()` is what it has logged so far (a
    CONNECT tunnel is logged when it closes)."""

    address: str
    directory: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def access_log(self) -> str:
        path = self.directory / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _squid_config(address: str, directory: Path, auth: bool, deny_ports: Sequence[int]) -> str:
    lines = [
        f"http_port {address}",
        f"pid_filename {directory}/squid.pid",
        f"access_log stdio:{directory}/access.log squid",
        f"cache_log {directory}/cache.log",
        f"coredump_dir {directory}",
        "cache deny all",
        "cache_mem 0 MB",
        "shutdown_lifetime 0 seconds",
        "pinger_enable off",
        "netdb_filename none",
        "icp_port 0",
        "htcp_port 0",
        "visible_hostname cgw-test-proxy",
        "dns_nameservers 127.0.0.1",
        "acl loopback_destination dst 127.0.0.1/32",
        "acl CONNECT method CONNECT",
        "http_access deny !loopback_destination",
    ]
    if deny_ports:
        lines += [f"acl denied_ports port {' '.join(map(str, deny_ports))}", "http_access deny denied_ports"]
    if auth:
        lines += [
            f"auth_param basic program {SQUID_AUTH_HELPER} {directory}/passwd",
            "auth_param basic children 1 startup=1 idle=1",
            "auth_param basic realm cgw-test",
            "acl authenticated proxy_auth REQUIRED",
            "http_access allow authenticated",
        ]
    lines += ["http_access allow all" if not auth else "http_access deny all"]
    return "\n".join(lines) + "\n"


def _openssl() -> str:
    found = shutil.which("openssl")
    if not found:
        raise RuntimeError("the `openssl` binary is not on PATH (Debian's openssl package)")
    return found


@asynccontextmanager
async def squid(
    credentials: tuple[str, str] | None = None, deny_ports: Sequence[int] = ()
) -> AsyncIterator[Proxy]:
    """Squid as a forward proxy on 127.0.0.1 (CONNECT and plain forwarding, to 127.0.0.1 only),
    asking for `credentials` (user, password) when given and answering 403 for `deny_ports`;
    yields once it accepts connections, stops it on exit."""
    found = os.environ.get("SQUID_BIN") or shutil.which("squid") or shutil.which("squid", path="/usr/sbin")
    if not found:
        raise RuntimeError(
            "the `squid` binary is not on PATH (nor in $SQUID_BIN or /usr/sbin): run .ci/servers-install "
            "(as root, or `make servers-install`) to install Debian's squid package"
        )
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="cgw-squid-") as name:
        directory = Path(name)
        directory.chmod(0o777)  # run as root, squid works as its own user (`proxy`)
        if credentials is not None:
            user, password = credentials
            openssl = await asyncio.create_subprocess_exec(
                _openssl(),
                "passwd",
                "-1",
                "-stdin",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            hashed = (await openssl.communicate(password.encode()))[0].decode().strip()
            if openssl.returncode != 0 or not hashed:
                raise RuntimeError("openssl passwd could not hash the proxy's password")
            (directory / "passwd").write_text(f"{user}:{hashed}\n")
            (directory / "passwd").chmod(0o644)
        config = directory / "squid.conf"
        config.write_text(_squid_config(address, directory, credentials is not None, deny_ports))
        log = directory / "squid.out"
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                found, "-N", "-f", str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        try:
            await wait_for_port(address, process, directory / "cache.log", name="squid")
            yield Proxy(address, directory)
        finally:
            await stop_process(process, signal.SIGINT)


@dataclass
class Jaeger:
    """A running Jaeger: exporters send OTLP/HTTP to `otlp_endpoint`; the query API is `query`."""

    otlp_endpoint: str
    query: str
    log: Path
    session: aiohttp.ClientSession

    async def services(self) -> list[str]:
        """The services that Jaeger holds spans of."""
        async with self.session.get(f"{self.query}/api/services") as reply:
            reply.raise_for_status()
            body = await reply.json()
        return list(body.get("data") or [])

    async def trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace `trace_id` (32 hex digits) as Jaeger's query API gives it (`spans`, `processes`),
        or None when Jaeger has no span of it."""
        async with self.session.get(f"{self.query}/api/traces/{trace_id}") as reply:
            if reply.status == 404:
                return None
            reply.raise_for_status()
            body = await reply.json()
        (found,) = body["data"]  # one trace per id
        assert isinstance(found, dict)
        return found


def jaeger_binary() -> str:
    found = os.environ.get("JAEGER_BIN") or str(Path(sys.executable).parent / "jaeger")
    if not os.access(found, os.X_OK):
        raise RuntimeError(
            f"no Jaeger at {found}: run `make jaeger-install` (it builds tests/jaeger/go.mod's pinned "
            "Jaeger into .venv/bin), or point $JAEGER_BIN at a Jaeger v2 binary"
        )
    return found


@asynccontextmanager
async def jaeger() -> AsyncIterator[Jaeger]:
    """Jaeger v2 with tests/jaeger/config.yaml on free ports of 127.0.0.1, storing in memory; yields
    once its OTLP receiver and its query API accept connections and the API answers; stops it on exit."""
    ports = {name: free_port() for name in ("OTLP_HTTP", "QUERY_HTTP", "QUERY_GRPC")}
    env = {**os.environ, **{f"JAEGER_{name}_PORT": str(port) for name, port in ports.items()}}
    otlp, query = f"127.0.0.1:{ports['OTLP_HTTP']}", f"127.0.0.1:{ports['QUERY_HTTP']}"
    with tempfile.TemporaryDirectory(prefix="cgw-jaeger-") as directory:
        log = Path(directory) / "jaeger.log"
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                jaeger_binary(), "--config", str(JAEGER_CONFIG),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        try:
            await wait_for_port(otlp, process, log, name="jaeger")
            await wait_for_port(query, process, log, name="jaeger")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                found = Jaeger(f"http://{otlp}", f"http://{query}", log, session)
                assert await found.services() == []
                yield found
        finally:
            await stop_process(process)


REPLICA_SHUTDOWN_DELAY = 3.0
"""A replica's not-ready time on SIGTERM: HAProxy's checks (inter 1s, fastinter 500ms, fall 2)
take it out in about 1.5 s."""
REPLICA_READY_SECONDS = 20.0
"""How long a gateway process may take to answer /readyz."""


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    address: str
    admin: str


async def start_replica(tenants: Path, session: aiohttp.ClientSession, **settings: str) -> Replica:
    """A gateway process (`settings`: more CGW_ variables), once its /readyz answers."""
    return await start_logged_replica(tenants, session, None, settings)


async def start_logged_replica(
    tenants: Path, session: aiohttp.ClientSession, log_file: Path | None, settings: Mapping[str, str]
) -> Replica:
    """`start_replica`, its stderr (its logs) appended to `log_file` when given."""
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = gateway_env(
        tenants,
        address,
        admin,
        **{
            "CGW_SHUTDOWN_GRACE_SECONDS": "5",
            "CGW_SHUTDOWN_DELAY_SECONDS": str(REPLICA_SHUTDOWN_DELAY),
            **settings,
        },
    )
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log_file else None
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canvas_gateway_server", env=env, stderr=log
        )
    finally:
        if log is not None:
            os.close(log)  # the child has its own copy
    replica = Replica(process, address, admin)
    deadline = time.monotonic() + REPLICA_READY_SECONDS
    while True:
        try:
            async with session.get(f"http://{admin}/readyz") as reply:
                if reply.status == 200:
                    return replica
        except aiohttp.ClientError:
            pass
        if process.returncode is not None or time.monotonic() > deadline:
            await stop_process(process, signal.SIGKILL)
            raise AssertionError(f"the gateway on {address} never became ready ({process.returncode})")
        await asyncio.sleep(0.05)


async def streams_handled(admin: str) -> float:
    """SendStream RPCs a gateway has handled, from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{admin}/metrics") as reply:
        text = await reply.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "grpc_server_handled"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["grpc_method"] == "SendStream"
    )
