"""The lean Redis client (stores/resp.py) against a real redis-server on 127.0.0.1: replies in
order over one pipelined connection, the URL's login and database, and each failure as the
stores expect it: a stall times out every command under way and is not sent again, a closed
connection is replaced and its command sent once more (once only), a script Redis forgot is
loaded again."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from canvas_gateway_server.stores import resp
from canvas_gateway_server.stores.resp import ConnectionLost, LeanRedis, ReplyError, address, encode
from servers import redis_server
from support import BUSY_LUA


def lean(url: str, timeout: float = 2.0) -> LeanRedis:
    return LeanRedis(address(url), timeout)


def test_commands_are_encoded_as_resp_arrays_of_bulk_strings() -> None:
    assert (
        encode(("SET", "k", b"\x00v", 7, 0.5))
        == b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\x00v\r\n$1\r\n7\r\n$3\r\n0.5\r\n"
    )


def test_the_url_is_read_and_refused_as_redis_py_would() -> None:
    where = address("redis://user:p%40ss@10.0.0.7:6380/3")
    assert (where.host, where.port, where.db, where.username, where.password) == (
        "10.0.0.7",
        6380,
        3,
        "user",
        "p@ss",
    )
    assert address("unix:///run/redis.sock?db=2").path == "/run/redis.sock"
    assert address("rediss://h:6380?ssl_cert_reqs=none").tls is not None
    with pytest.raises(TypeError):
        address("redis://127.0.0.1:6379/0?Jw3=1")  # an option redis-py does not know
    with pytest.raises(ValueError, match="socket_timeout"):
        address("redis://127.0.0.1:6379/0?socket_timeout=Jw3")


async def test_replies_come_back_to_their_callers_in_order_over_one_connection() -> None:
    async with redis_server() as server:
        client = lean(server.url)
        try:
            replies = await asyncio.gather(*(client.call("INCR", f"n{index % 7}") for index in range(700)))
            assert sorted(replies) == sorted(n for _ in range(7) for n in range(1, 101))
            assert [await client.call("GET", f"n{index}") for index in range(7)] == [b"100"] * 7
            assert "connected_clients:1\r\n" in (await client.call("INFO", "clients")).decode()
            with pytest.raises(ReplyError, match="WRONGTYPE"):
                await client.pipeline([("LPUSH", "n0", "x"), ("PING",)])
            assert await client.call("PING") == b"PONG"  # the line is still in step
        finally:
            await client.aclose()


async def test_the_url_logs_in_and_selects_its_database() -> None:
    async with redis_server() as server:
        admin = lean(server.url)
        try:
            await admin.call("CONFIG", "SET", "requirepass", "s3cret/pass")
            await admin.aclose()  # its next connection must log in
            client = lean(server.url.replace("redis://", "redis://:s3cret%2Fpass@") + "/5")
            await client.call("SET", "here", "5")
            assert await client.call("SELECT", "0") == b"OK"
            assert await client.call("GET", "here") is None
            await client.aclose()
            assert await client.call("GET", "here") == b"5"  # a new connection: database 5 again
            await client.aclose()
            with pytest.raises(ReplyError, match="refused the login"):
                await lean(server.url.replace("redis://", "redis://:wrong@")).call("PING")
        finally:
            await lean(server.url.replace("redis://", "redis://:s3cret%2Fpass@")).call(
                "CONFIG", "SET", "requirepass", ""
            )


async def test_a_stalled_redis_times_out_every_command_under_way_and_none_is_sent_again() -> None:
    async with redis_server() as server:
        client, admin = lean(server.url, timeout=0.3), lean(server.url)
        try:
            await client.call("SET", "count", "0")
            await admin.call("CLIENT", "PAUSE", "1500", "ALL")
            started = time.monotonic()
            stalled = await asyncio.gather(
                *(client.call("INCR", "count") for _ in range(5)), return_exceptions=True
            )
            assert all(isinstance(reply, TimeoutError) for reply in stalled)
            assert time.monotonic() - started < 1.2  # not one timeout after another
            await admin.call("CLIENT", "UNPAUSE")
            assert await client.call("INCR", "count") <= 6  # each stalled command ran at most once
            assert await client.call("PING") == b"PONG"
        finally:
            await client.aclose()
            await admin.aclose()


async def test_a_command_after_a_stalled_one_keeps_its_own_deadline() -> None:
    """Only the command whose deadline passed fails: one sent later, answered within its own
    time once Redis is free again, is taken (Redis ran it; a timeout would have said otherwise)."""
    async with redis_server() as server:
        client, admin = lean(server.url, timeout=0.6), lean(server.url)
        try:
            await client.call("PING")
            busy = asyncio.ensure_future(admin.call("EVAL", BUSY_LUA, 0, 900))  # Redis busy for 0.9 s
            await asyncio.sleep(0.05)
            first = asyncio.ensure_future(client.call("SET", "first", "1"))
            await asyncio.sleep(0.5)
            second = await client.call("SET", "second", "2")  # due at 1.1 s: answered at about 0.9 s
            with pytest.raises(TimeoutError):
                await first
            assert second == b"OK"
            await busy
            assert await client.call("GET", "first") == b"1"  # the one that timed out ran too
        finally:
            await client.aclose()
            await admin.aclose()


async def test_a_connection_that_never_answers_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that takes commands and answers nothing (gone without a word): each command times
    out, and once the oldest has waited DEAD_SECONDS the connection is dropped for a new one."""
    monkeypatch.setattr(resp, "DEAD_SECONDS", 0.5)
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = lean(f"redis://127.0.0.1:{port}", timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            await client.call("PING")
        await asyncio.sleep(0.5)
        with pytest.raises(TimeoutError):
            await client.call("PING")  # its deadline finds the first one unanswered for 0.7 s
        with pytest.raises(TimeoutError):
            await client.call("PING")  # on a new connection
        assert len(writers) == 2
    finally:
        await client.aclose()
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


async def test_a_closed_connection_is_replaced_and_its_command_sent_once_more_and_only_once() -> None:
    async with redis_server() as server:
        client, admin = lean(server.url), lean(server.url)
        try:
            await client.call("CLIENT", "SETNAME", "lean")

            async def kill_when_blocked() -> None:
                while b"cmd=blpop" not in await admin.call("CLIENT", "LIST"):
                    await asyncio.sleep(0.01)
                await admin.call("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

            waiting = asyncio.ensure_future(client.call("BLPOP", "work", "5"))
            await kill_when_blocked()  # under way: sent once more on a new connection, which blocks too
            await asyncio.sleep(0.05)
            while b"cmd=blpop" not in await admin.call("CLIENT", "LIST"):
                await asyncio.sleep(0.01)
            await admin.call("RPUSH", "work", "job")
            assert await waiting == [b"work", b"job"]

            twice = asyncio.ensure_future(client.call("BLPOP", "work", "5"))
            await kill_when_blocked()
            await kill_when_blocked()
            with pytest.raises(ConnectionLost):
                await twice
            await server.restart()  # the connection is found closed: the next command opens another
            assert await client.call("PING") == b"PONG"
        finally:
            await client.aclose()
            await admin.aclose()


async def test_a_script_redis_forgot_is_loaded_again() -> None:
    async with redis_server() as server:
        client = lean(server.url)
        try:
            script = client.script("return {KEYS[1], ARGV[1]}")
            assert await script(["k"], ["v"]) == [b"k", b"v"]
            await client.call("SCRIPT", "FLUSH")
            assert await script(["k"], [7]) == [b"k", b"7"]
            with pytest.raises(ReplyError):
                await client.script("return redis.call('NOSUCH')")([], [])
        finally:
            await client.aclose()
