"""A raw HTTP/2 peer over asyncio, for what no gRPC client will do: open and reset streams at
once (rapid reset), stall mid-handshake or mid-request, never answer a ping.

Frames are written by hand (RFC 9113); header blocks use HPACK literals without indexing, so
no HPACK state is needed to send them, and the server's header blocks are never decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL, REFUSED_STREAM = 0x8, 0x7


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name (RFC 7541 6.2.2)."""
    return b"\x00" + _string(name) + _string(value)


def _string(text: bytes) -> bytes:
    assert len(text) < 127
    return bytes((len(text),)) + text


def request_headers(path: str, token: str = "") -> bytes:
    """The header block of a gRPC call to `path`, with a bearer token when given."""
    block = b"".join(
        _literal(name, value)
        for name, value in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )
    return block + (_literal(b"authorization", f"Bearer {token}".encode()) if token else b"")


def grpc_message(body: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(body)) + body


@dataclass
class Seen:
    """What the server sent on a connection, and when it ended it (time.monotonic)."""

    frames: Counter[int] = field(default_factory=Counter)
    resets: Counter[int] = field(default_factory=Counter)
    goaway: bytes | None = None
    closed_at: float | None = None


class RawConnection:
    """One TCP connection to a gRPC server, driven frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.seen = Seen()
        self.opened_at = time.monotonic()
        self._reading: asyncio.Task[None] | None = None
        self._next_stream = 1

    @classmethod
    async def open(cls, port: int, *, handshake: bool = True, answer_pings: bool = True) -> RawConnection:
        """Connect; with `handshake`, send the preface and SETTINGS and acknowledge the server's."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = cls(reader, writer)
        if handshake:
            writer.write(PREFACE + frame(SETTINGS, 0, 0))
            await writer.drain()
        connection._reading = asyncio.create_task(connection._read(handshake, answer_pings and handshake))
        return connection

    async def _read(self, answer_settings: bool, answer_pings: bool) -> None:
        """Read frames until the server closes; a peer that never sent its preface stays silent."""
        try:
            while True:
                head = await self._reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                payload = await self._reader.readexactly(length)
                self.seen.frames[kind] += 1
                if kind == SETTINGS and not flags & ACK and answer_settings:
                    self._writer.write(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK and answer_pings:
                    self._writer.write(frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM:
                    self.seen.resets[int.from_bytes(payload, "big")] += 1
                elif kind == GOAWAY:
                    self.seen.goaway = payload
        except (asyncio.IncompleteReadError, ConnectionError):
            self.seen.closed_at = time.monotonic()

    async def closed(self, within: float) -> float | None:
        """Seconds from opening until the server closed the connection; None if it did not within `within`."""
        assert self._reading is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), within)
        except TimeoutError:
            return None
        assert self.seen.closed_at is not None
        return self.seen.closed_at - self.opened_at

    def start_call(
        self, path: str, token: str = "", message: bytes | None = None, *, reset: bool = False
    ) -> None:
        """Open a stream for a call: its headers, then its message (ending the stream) if given,
        then RST_STREAM (CANCEL) if `reset`. Buffered: `flush` sends."""
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        out = frame(HEADERS, END_HEADERS, stream, request_headers(path, token))
        if message is not None:
            out += frame(DATA, END_STREAM, stream, grpc_message(message))
        if reset:
            out += frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL))
        self._writer.write(out)

    async def flush(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
