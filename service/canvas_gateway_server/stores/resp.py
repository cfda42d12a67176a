"""A lean Redis client for the stores' hot path: one connection per process, every command
pipelined on it.

Why not redis-py's asyncio client (which reads the URL here, `parse_url`): it spends 100-200 us of
CPU on each command (a connection taken from a pool and put back, a reader task, its own
timeout per command), and a gateway runs 2 to 5 scripts per batch. Here commands issued in the
same turn of the event loop go out in one write, and hiredis parses every reply that one read
brings, so the CPU per command falls to a few tens of us with a few batches in flight
(`bench/redis_cost.py`). Redis answers the commands of one connection in order, so the replies
are matched to their callers first in, first out; a caller that gave up keeps its place in the line.

Failures, as the stores expect them (each becomes `StoreUnavailable` in `stores.redis`):
- A command not answered within `timeout` raises `TimeoutError`, and only that command: the ones
  sent after it keep their own deadlines, and a stalled Redis that answers them in time is taken
  at its word. Redis may still run a command that timed out; every script the stores run is
  safe to run twice. A connection whose oldest command has had no reply for DEAD_SECONDS is
  dropped (a peer gone without a word), and the next command opens another.
- A connection found closed (Redis restarted) is replaced, and a command that was under way
  on it is sent once more on the new one; never after a timeout.
- An error reply raises `ReplyError`; NOSCRIPT is handled by `Script`, which loads its script
  again (after a restart of Redis) and runs it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import hiredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection, parse_url

Arg: TypeAlias = str | bytes | int | float
DEAD_SECONDS: Final = 10.0
"""A connection whose oldest command has had no reply this long is taken as gone."""
_CRLF: Final = b"\r\n"


class ReplyError(Exception):
    """Redis answered with an error (its text is Redis' own: never shown to callers of the stores)."""


class ConnectionLost(ConnectionError):
    """The connection closed before the command was answered."""


def encode(parts: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, float):
            data = repr(part).encode()
        else:
            data = str(part).encode()
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(_CRLF)
    return b"".join(out)


@dataclass(frozen=True)
class Address:
    """Where Redis is and how to log in, read from a redis://, rediss:// or unix:// URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


def address(url: str) -> Address:
    """The URL read by redis-py's own parser, so a URL is taken or refused as redis-py would;
    ValueError or TypeError for one it refuses. Its TLS query parameters (ssl_ca_certs,
    ssl_cert_reqs, ssl_certfile, ssl_keyfile, ssl_check_hostname) are honoured; redis-py's
    other connection options (socket_timeout, ...) are taken and have no effect: CGW_REDIS_TIMEOUT_SECONDS
    sets the one timeout."""
    found: dict[str, Any] = dict(parse_url(url))
    kind = found.pop("connection_class", Connection)
    kind(**found)  # an object, no I/O: refuses an option redis-py does not know (TypeError)
    tls = None
    if kind is SSLConnection:
        tls = ssl.create_default_context(cafile=found.get("ssl_ca_certs"))
        if found.get("ssl_certfile"):
            tls.load_cert_chain(found["ssl_certfile"], found.get("ssl_keyfile"))
        if str(found.get("ssl_cert_reqs", "required")).lower() in ("none", "0"):
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        elif found.get("ssl_check_hostname") is False:
            tls.check_hostname = False
    return Address(
        host=str(found.get("host", "127.0.0.1")),
        port=int(found.get("port", 6379)),
        path=str(found["path"]) if kind is UnixDomainSocketConnection else "",
        db=int(found.get("db", 0)),
        username=found.get("username"),
        password=found.get("password"),
        tls=tls,
    )


class _Waiting:
    __slots__ = ("deadline", "future")

    def __init__(self, future: asyncio.Future[Any], deadline: float) -> None:
        self.future = future
        self.deadline = deadline


class _Line(asyncio.Protocol):
    """One connection: commands written in batches, replies handed out in order."""

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:  # nothing asked for it: the line is out of step
                self.drop()
                return
            future = self._waiting.popleft().future
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        while self._waiting:
            future = self._waiting.popleft().future
            if not future.done():
                future.set_exception(ConnectionLost("the connection to Redis closed"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """The reply to `command`, which goes out with the others of this turn of the loop."""
        if self.closed:
            raise ConnectionLost("the connection to Redis is closed")
        future = self._loop.create_future()
        self._waiting.append(_Waiting(future, self._loop.time() + self._timeout))
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        if self._timer is None:
            self._timer = self._loop.call_at(self._waiting[-1].deadline, self._expire)
        return future

    def _flush(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def _expire(self) -> None:
        """Called at the oldest deadline: each command not answered by its own deadline fails with
        TimeoutError (none is sent again; its reply, if it comes, is skipped); the others wait on.
        A connection whose oldest command has waited DEAD_SECONDS for its reply is dropped."""
        self._timer = None
        now = self._loop.time()
        for waiting in self._waiting:
            if waiting.future.done():
                continue
            if waiting.deadline > now:
                self._timer = self._loop.call_at(waiting.deadline, self._expire)
                break
            waiting.future.set_exception(TimeoutError())
        # The oldest command still without its reply (answered or timed out, it is first in line):
        # sent DEAD_SECONDS ago with nothing back since, the peer is gone.
        if self._waiting and now - (self._waiting[0].deadline - self._timeout) > DEAD_SECONDS:
            self.drop()

    def drop(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class LeanRedis:
    """Commands and scripts on one pipelined connection, opened on first use and replaced when lost."""

    def __init__(self, where: Address, timeout: float) -> None:
        self._where = where
        self._timeout = timeout
        self._line: _Line | None = None
        self._opening: asyncio.Task[_Line] | None = None

    async def _open(self) -> _Line:
        loop = asyncio.get_running_loop()
        where = self._where
        async with asyncio.timeout(self._timeout):
            if where.path:
                _, line = await loop.create_unix_connection(lambda: _Line(self._timeout), where.path)
            else:
                _, line = await loop.create_connection(
                    lambda: _Line(self._timeout), where.host, where.port, ssl=where.tls
                )
        hello: list[asyncio.Future[Any]] = []
        if where.password is not None:
            login = (where.username, where.password) if where.username else (where.password,)
            hello.append(line.send(encode(("AUTH", *login))))
        if where.db:
            hello.append(line.send(encode(("SELECT", where.db))))
        for reply in await asyncio.gather(*hello):
            if isinstance(reply, hiredis.ReplyError):
                line.drop()
                raise ReplyError("Redis refused the login or the database")
        return line

    async def _ready(self) -> _Line:
        line = self._line
        if line is not None and not line.closed:
            return line
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        opening = self._opening
        try:
            self._line = await asyncio.shield(opening)
        finally:
            if self._opening is opening and opening.done():
                self._opening = None
        return self._line

    async def call(self, *parts: Arg) -> Any:
        """One command's reply; ReplyError for an error reply."""
        command = encode(parts)
        line = self._line
        if line is None or line.closed:
            line = await self._ready()
        try:
            reply = await line.send(command)
        except ConnectionLost:  # the connection closed under it: once more on a new one
            reply = await (await self._ready()).send(command)
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """The replies to `commands`, written together; ReplyError for the first error reply."""
        encoded = [encode(parts) for parts in commands]
        for attempt in (1, 2):
            line = await self._ready()
            sent = [line.send(command) for command in encoded]
            try:
                replies = [await future for future in sent]
            except ConnectionLost:
                if attempt == 2:
                    raise
                continue  # the connection closed under them: once more on a new one
            finally:
                for future in sent:  # those not awaited: their failure is this one, or none
                    if not future.done():
                        future.cancel()  # the caller is gone (its reply is skipped when it comes)
                    elif not future.cancelled():
                        future.exception()
            for reply in replies:
                if isinstance(reply, hiredis.ReplyError):
                    raise ReplyError(str(reply))
            return replies
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        await self.call("PING")

    def script(self, text: str) -> Script:
        return Script(self, text)

    async def aclose(self) -> None:
        """Close the connection; commands under way fail. The client may be used again after."""
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        line, self._line = self._line, None
        if line is not None:
            line.drop()


class Script:
    """A Lua script run by its digest (EVALSHA), loaded again when Redis does not know it."""

    def __init__(self, client: LeanRedis, text: str) -> None:
        self._client = client
        self._text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()  # what EVALSHA names

    async def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await self._client.call(*command)
        except ReplyError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
        await self._client.call("SCRIPT", "LOAD", self._text)
        return await self._client.call(*command)
