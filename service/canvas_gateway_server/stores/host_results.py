"""The host's idempotency store: one SQLite file every worker of a gateway shares (no Redis).

With several workers a repeat may reach another worker than the first call did, so the
workers keep their claims and results in one file (CGW_IDEMPOTENCY_FILE, created by the
supervisor), as their budgets share one mapped file. The file outlives the gateway: a
restart on the host finds what was kept. It is `idempotency.ResultStore` with the rules of
`stores.redis.RedisResults`, held to the same tests:

- one row per (scope, batch index): digest, the claiming process (owner) and token, when it
  was claimed, the kept result (NULL while claimed, b"" for LOST), when it expires, and
  whether its call may have left (`sending`, set by `mark_sending` in one statement);
- each process beats a row of `owners` every HEARTBEAT_SECONDS; a claim whose owner has not
  beaten for HEARTBEAT_LAPSE_SECONDS (a worker killed, a gateway restarted) is claimed again at
  once if its call never left, else LOST;
- a claim of a batch nobody holds is one INSERT; of one that is held, one `BEGIN IMMEDIATE`
  transaction (the write lock first): two workers claiming one batch are ordered, never both
  CLAIMED; a keep is one statement;
- expired rows are deleted in the background, a slice at a time.

Why SQLite: it is in the standard library, it locks across processes, and in WAL mode with
`synchronous=NORMAL` a commit is a write to the OS, not a disk flush: a claim and a keep cost
tens of microseconds (BENCHMARKS.md, `bench/redis_cost.py`). A gateway killed at any moment
loses nothing committed; a power cut may lose the last commits, as a reboot empties /tmp
anyway.

Where calls run: a claim, a mark and a keep run on the event loop, on a connection of its own
that never waits for the write lock (a busy timeout of 0) and never checkpoints
(`wal_autocheckpoint=0`): a commit there is a write to the OS, tens of microseconds. While
another writer holds the lock (another worker, or this process's thread) an attempt is refused
at once, having changed nothing, and is made again after a short sleep (LOCK_RETRY_SECONDS,
doubling to LOCK_RETRY_MAX_SECONDS, with jitter) for up to BUSY_SECONDS: the loop is never held
waiting. Everything else (the heartbeat, the purge, GetResults' rows and reads) runs on a thread
of its own, whose connection waits for the lock, and so do the checkpoints (the flushes to disk),
at its commits. Why not the claims on that thread too: the hop there and back cost about 100 us
of CPU a call, 3 a batch, more than the SQLite work itself (`bench/redis_cost.py`, host file:
caller CPU per batch; 2 processes at once). Why not SQLite's own wait for the lock: it sleeps in
steps of up to 100 ms, and a worker waiting that way lost the lock for up to a second to one
writing flat out (a two-process script, not a measure of the suite).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from ..context import IdempotencyScope
from ..errors import ConfigError, StoreUnavailable
from ..idempotency import Claim, Verdict
from ..outcomes import Row
from ..settings import State
from .heartbeat import Heartbeat

T = TypeVar("T")

HEARTBEAT_SECONDS: Final = 1.0
"""How often a process renews its row in `owners`."""
HEARTBEAT_LAPSE_SECONDS: Final = 5.0
"""A process whose row is this old is taken as gone: its claims are LOST."""
PURGE_ROWS: Final = 1000
"""Expired rows deleted at each heartbeat, at most (a short transaction)."""
BUSY_SECONDS: Final = 2.0
"""Longest wait for another worker's write lock before the store counts as not answering."""
LOCK_RETRY_SECONDS: Final = 0.0002
"""A call on the event loop that finds the lock held tries again after about this long..."""
LOCK_RETRY_MAX_SECONDS: Final = 0.002
"""...doubling up to this (the lock is held tens of microseconds a commit)."""

_OUTCOMES: Final = """CREATE TABLE IF NOT EXISTS outcomes (
    tenant TEXT NOT NULL,
    handle TEXT NOT NULL,
    entry TEXT NOT NULL,
    data BLOB NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (tenant, handle, entry)
)"""
"""GetResults' rows, about 1.3 KB each (a batch's recipients' hashes), in a rowid table: appended in
the order they come, where a WITHOUT ROWID table keeps them in key order, splitting pages (SQLite
advises it for rows under about a 20th of a page), at about twice the CPU per row
(`bench/results_cost.py`). `results` and `owners`, small rows read by their key, are WITHOUT ROWID."""

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS results (
    scope TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest TEXT NOT NULL,
    owner TEXT NOT NULL,
    token TEXT NOT NULL,
    at REAL NOT NULL,
    kept BLOB,
    expires REAL NOT NULL,
    sending INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS results_expiry ON results (expires);
{_OUTCOMES};
CREATE INDEX IF NOT EXISTS outcomes_expiry ON outcomes (expires);
CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, beat REAL NOT NULL) WITHOUT ROWID;
"""


_CLAIM_NEW: Final = (
    "INSERT INTO results (scope, idx, digest, owner, token, at, kept, expires) "
    "VALUES (?, ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (scope, idx) DO NOTHING"
)


def default_path(port: int) -> str:
    """Where a gateway on `port` keeps its keys without CGW_IDEMPOTENCY_FILE: a private folder
    in the temporary directory ($TMPDIR, else /tmp), named by the port, so that a restart on
    the port finds them."""
    return os.path.join(tempfile.gettempdir(), f"canvas-gateway-{port}", "keys.sqlite3")


def keys_file(state: State, grpc_port: int, folder: str = "") -> str:
    """The file of a gateway's keys without Redis: CGW_IDEMPOTENCY_FILE; else the default path
    for its port; on port 0 (a port that a restart does not find again) the supervisor's
    `folder`, or "" for one process: its own memory (`LocalResults`)."""
    if state.idempotency_file:
        return state.idempotency_file
    if grpc_port:
        return default_path(grpc_port)
    return os.path.join(folder, "keys.sqlite3") if folder else ""


def create(path: str, private_folder: bool) -> None:
    """Make the file (and, for the default path, its private folder) ready for the workers.

    The default folder is in a shared temporary directory: it must be this user's own and
    closed to others (else another local user could read or forge what is kept)."""
    folder = Path(path).parent
    if private_folder:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        found = folder.lstat()
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o077:
            raise ConfigError(
                f"{folder} (idempotency keys' store) must be a folder of this user's, closed to others; "
                "remove it, or set CGW_IDEMPOTENCY_FILE"
            )
    try:
        connection = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            _outcomes_by_rowid(connection)
            connection.executescript(_SCHEMA)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(results)")}
            if "sending" not in columns:  # a file made before claims were marked
                connection.execute("ALTER TABLE results ADD COLUMN sending INTEGER NOT NULL DEFAULT 0")
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise ConfigError(
            f"cannot open {path} (CGW_IDEMPOTENCY_FILE) as the idempotency keys' store: {exc}"
        ) from None


def _outcomes_by_rowid(db: sqlite3.Connection) -> None:
    """A file made when `outcomes` was WITHOUT ROWID gets the rowid table, its rows kept (before
    any worker starts, in one transaction)."""
    found = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outcomes'").fetchone()
    if found is None or "WITHOUT ROWID" not in found[0].upper():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DROP INDEX IF EXISTS outcomes_expiry")  # made again, on the new table, by _SCHEMA
        db.execute("ALTER TABLE outcomes RENAME TO outcomes_before")
        db.execute(_OUTCOMES)
        db.execute(
            "INSERT INTO outcomes (tenant, handle, entry, data, expires) "
            "SELECT tenant, handle, entry, data, expires FROM outcomes_before"
        )
        db.execute("DROP TABLE outcomes_before")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _unavailable(exc: sqlite3.Error) -> StoreUnavailable:
    return StoreUnavailable(f"the host's idempotency store (SQLite) did not answer ({type(exc).__name__})")


class HostResults:
    """An `idempotency.ResultStore` in a SQLite file shared by the host's workers."""

    def __init__(self, path: str, ttl: float, lease: float, clock: Callable[[], float] = time.time) -> None:
        self._ttl = ttl
        self._lease = lease
        self._clock = clock
        self.owner = uuid.uuid4().hex
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="keys-sqlite")
        self._db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
        """The thread's connection (heartbeat, GetResults): it waits for the lock, and checkpoints."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._quick = sqlite3.connect(path, timeout=0.0, isolation_level=None)
        """The event loop's (claims, marks, keeps): refused at once while another writer holds the
        lock; no checkpoints."""
        self._quick.execute("PRAGMA synchronous=NORMAL")
        self._quick.execute("PRAGMA wal_autocheckpoint=0")
        self._heartbeat = Heartbeat(self.beat, HEARTBEAT_SECONDS)
        self._beaten = False
        """Whether this process's heartbeat row was written: its first claim waits for it."""

    async def _run(self, operation: Callable[..., T], *args: object) -> T:
        """`operation(connection, *args)` on the thread."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, operation, self._db, *args)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from None

    async def _soon(self, operation: Callable[..., T], *args: object) -> T:
        """`operation(connection, *args)` on the event loop's connection; while another writer
        holds the lock (the attempt refused at once, having changed nothing), again after a
        short sleep, for up to BUSY_SECONDS."""
        delay, give_up = LOCK_RETRY_SECONDS, time.monotonic() + BUSY_SECONDS
        while True:
            try:
                return operation(self._quick, *args)
            except sqlite3.Error as exc:
                busy = (
                    isinstance(exc, sqlite3.OperationalError)
                    and exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                )
                if not busy or time.monotonic() >= give_up:
                    raise _unavailable(exc) from None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, LOCK_RETRY_MAX_SECONDS)

    async def claim(self, scope: IdempotencyScope, index: int, digest: str, token: str) -> Claim:
        if not self._beaten:  # a claim of a process not seen beating would be taken as dead
            await self.beat()
        return await self._soon(self._claim, scope.text(), index, digest, token)

    def _claim(self, db: sqlite3.Connection, scope: str, index: int, digest: str, token: str) -> Claim:
        now = self._clock()
        row = (scope, index, digest, self.owner, token, now, now + self._ttl)
        # The usual case, a batch nobody holds, in one statement; else one transaction decides.
        if db.execute(_CLAIM_NEW, row).rowcount == 1:
            return Claim(Verdict.CLAIMED)
        db.execute("BEGIN IMMEDIATE")
        try:
            claim = self._decide(db, scope, index, digest, token, now)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return claim

    def _decide(
        self, db: sqlite3.Connection, scope: str, index: int, digest: str, token: str, now: float
    ) -> Claim:
        row = db.execute(
            "SELECT digest, owner, at, kept, expires, sending FROM results WHERE scope = ? AND idx = ?",
            (scope, index),
        ).fetchone()
        if row is None or row[4] <= now:  # gone since, or expired and not purged yet
            db.execute(
                "INSERT OR REPLACE INTO results (scope, idx, digest, owner, token, at, kept, expires) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                (scope, index, digest, self.owner, token, now, now + self._ttl),
            )
            return Claim(Verdict.CLAIMED)
        found, owner, at, kept, _, sending = row
        if found != digest:
            return Claim(Verdict.MISMATCH, None if kept is None else bytes(kept))
        if kept is not None:
            return Claim(Verdict.KEPT, bytes(kept))
        beat = db.execute(
            "SELECT 1 FROM owners WHERE owner = ? AND beat > ?", (owner, now - HEARTBEAT_LAPSE_SECONDS)
        ).fetchone()
        if (owner == self.owner or beat is not None) and at + self._lease > now:
            return Claim(Verdict.BUSY)
        if not sending:  # its call never started: nothing can have reached Braze
            db.execute(
                "UPDATE results SET owner = ?, token = ?, at = ?, expires = ? WHERE scope = ? AND idx = ?",
                (self.owner, token, now, now + self._ttl, scope, index),
            )
            return Claim(Verdict.RECLAIMED)
        db.execute("UPDATE results SET kept = x'' WHERE scope = ? AND idx = ?", (scope, index))
        return Claim(Verdict.LOST)

    async def mark_sending(self, scope: IdempotencyScope, index: int, token: str) -> bool:
        return await self._soon(self._mark, scope.text(), index, token)

    @staticmethod
    def _mark(db: sqlite3.Connection, scope: str, index: int, token: str) -> bool:
        marked: int = db.execute(
            "UPDATE results SET sending = 1 WHERE scope = ? AND idx = ? AND token = ? AND kept IS NULL",
            (scope, index, token),
        ).rowcount
        return marked == 1

    async def keep(
        self, scope: IdempotencyScope, index: int, digest: str, token: str, kept: bytes | None
    ) -> None:
        await self._soon(self._keep, scope.text(), index, digest, token, kept)

    def _keep(
        self, db: sqlite3.Connection, scope: str, index: int, digest: str, token: str, kept: bytes | None
    ) -> None:
        if kept is None:
            db.execute(
                "DELETE FROM results WHERE scope = ? AND idx = ? AND token = ? AND kept IS NULL",
                (scope, index, token),
            )
            return
        now = self._clock()
        db.execute(  # unless another call's claim holds the batch now
            "INSERT INTO results (scope, idx, digest, owner, token, at, kept, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope, idx) DO UPDATE "
            "SET digest = excluded.digest, kept = excluded.kept, expires = excluded.expires "
            "WHERE results.kept IS NOT NULL OR results.token = excluded.token",
            (scope, index, digest, self.owner, token, now, kept, now + self._ttl),
        )

    async def record(self, rows: Sequence[Row]) -> None:
        await self._run(self._record, list(rows))

    def _record(self, db: sqlite3.Connection, rows: list[Row]) -> None:
        expires = self._clock() + self._ttl
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO outcomes (tenant, handle, entry, data, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                [(*row, expires) for row in rows],
            )
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def read(self, tenant: str, handle: str) -> list[bytes]:
        return await self._run(self._read, tenant, handle)

    def _read(self, db: sqlite3.Connection, tenant: str, handle: str) -> list[bytes]:
        rows = db.execute(
            "SELECT data FROM outcomes WHERE tenant = ? AND handle = ? AND expires > ?",
            (tenant, handle, self._clock()),
        ).fetchall()
        return [bytes(row[0]) for row in rows]

    def _beat(self, db: sqlite3.Connection) -> int:
        """Renew this process's heartbeat and delete a slice of what has expired; how many rows."""
        now = self._clock()
        db.execute("INSERT OR REPLACE INTO owners VALUES (?, ?)", (self.owner, now))
        purged = db.execute(
            "DELETE FROM results WHERE (scope, idx) IN "
            "(SELECT scope, idx FROM results WHERE expires <= ? LIMIT ?)",
            (now, PURGE_ROWS),
        ).rowcount
        purged += db.execute(
            "DELETE FROM outcomes WHERE (tenant, handle, entry) IN "
            "(SELECT tenant, handle, entry FROM outcomes WHERE expires <= ? LIMIT ?)",
            (now, PURGE_ROWS),
        ).rowcount
        db.execute("DELETE FROM owners WHERE beat <= ?", (now - self._ttl,))
        return purged

    async def beat(self) -> int:
        purged = await self._run(self._beat)
        self._beaten = True
        return purged

    def start(self, on_failure: Callable[[], None] = lambda: None) -> None:
        """Keep this process's heartbeat alive (and purge) until `stop`."""
        self._heartbeat.start(on_failure)

    async def stop(self) -> None:
        """Stop beating and close; this process's claims left behind are LOST at once."""
        await self._heartbeat.stop()
        with contextlib.suppress(StoreUnavailable):
            await self._run(sqlite3.Connection.execute, "DELETE FROM owners WHERE owner = ?", (self.owner,))
        self._quick.close()
        await self._run(sqlite3.Connection.close)
        self._thread.shutdown()
