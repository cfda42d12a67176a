"""tests/servers.py's servers themselves: Redis answers and comes back empty on the same port after
a restart; deploy/haproxy/haproxy.cfg is valid for 1 to 3 backends and refuses to run without its
frontend address."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis.asyncio as aioredis
from servers import HAPROXY_CONFIG, binary, haproxy_environment, redis_server


async def test_redis_answers_and_a_restart_brings_it_back_empty_on_the_same_port() -> None:
    async with redis_server() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = aioredis.Redis.from_url(server.url)
        try:
            assert await client.ping() is True
            await client.set("budget:acme", 7)
            assert await client.get("budget:acme") == b"7"
            await server.stop()
            with pytest.raises(aioredis.ConnectionError):
                await client.ping()
            await server.start()
            port = server.port
            await server.restart()
            assert server.port == port
            assert await client.ping() is True  # the same client reconnects: same address
            assert await client.dbsize() == 0  # nothing was persisted
        finally:
            await client.aclose()
    assert server.process is not None and server.process.returncode is not None


async def haproxy_check(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        binary("haproxy", "HAPROXY_BIN"),
        "-c",
        "-f",
        str(HAPROXY_CONFIG),
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CGW_")}, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.parametrize("replicas", [1, 2, 3])
async def test_the_haproxy_config_is_valid_for_each_number_of_backends(replicas: int) -> None:
    backends = [(f"127.0.0.1:{5000 + n}", f"127.0.0.1:{6000 + n}") for n in range(replicas)]
    code, output = await haproxy_check(haproxy_environment("127.0.0.1:4999", backends, "127.0.0.1:4998"))
    assert code == 0, output


async def test_the_haproxy_config_refuses_to_run_without_its_addresses() -> None:
    code, output = await haproxy_check({})
    assert code != 0
    assert "'bind' expects" in output
    with pytest.raises(ValueError, match="1 to 3 backends"):
        haproxy_environment("127.0.0.1:4999", [])
