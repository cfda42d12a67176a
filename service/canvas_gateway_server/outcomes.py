"""Outcomes kept after the fact: every batch's result, queryable by idempotency key or request id.

While a stream is open each recipient gets one result; afterwards only this record answers "what
happened to job Y, and to user X in it?". `Recorder.record` keeps each result as it was made
(`reporting.made`'s moment: delivered to its caller or not) under the request's handles:

- `request:<request id>` for every request, keyed or not (the id the servicer gives each RPC);
- `key:<idempotency key>` as well for a keyed request, unless the result was replayed from the
  key (the key's record keeps the result of the call that sent the batch).

Each is kept per tenant, for CGW_RESULTS_TTL_SECONDS, in the results store (`OutcomeStore`: in
memory, the host's SQLite file, Redis) and read back by `GetResults` and `FindRecipient`, which
never call Braze.

What is kept per recipient, and why: its position, and a keyed hash of its identifier, never
the identifier. Each batch draws a random 16-byte salt, kept with it; each recipient's
identifier (`external_user_id`, `user_alias`'s label and name, or `email`) is hashed with it
(BLAKE2b, 8 bytes). A lookup hashes the identifier it is asked about with each batch's salt and
compares: it answers "which position, which result" for someone who already knows the
identifier, and the record reveals no identifier to whoever reads the store, nor links one
recipient across batches (each salt is new). 8 bytes make a false match within a request of a
million recipients about 1 in 10^7. Contexts, attributes and the Canvas's content are never
kept. CGW_RESULTS_KEPT=false keeps nothing (the RPCs then answer NOT_FOUND).

Over the ~300 lines the house aims for, for a reason: the record's format (handles, salted
hashes, `encode`/`decode`) and the `Recorder` that writes and reads it change together, and
each store keeps the bytes it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from .context import RequestContext
from .errors import StoreLost, StoreUnavailable
from .metrics import Metrics
from .model import Batch, BatchResult, Code, Outcome, Rule, Violation

log = logging.getLogger(__name__)

SALT_BYTES: Final = 16
HASH_BYTES: Final = 8

_FIELDS: Final = (
    "batch_index",
    "status_message",
    "retryable",
    "dispatch_id",
    "message",
    "notice",
    "http_status",
    "attempts",
    "rate_limit_reset",
    "retry_at",
    "quota",
    "replayed",
)


Row = tuple[str, str, str, bytes]
"""One kept outcome as a store writes it: tenant, handle, entry (a batch index), data."""


class OutcomeStore(Protocol):
    """Where kept outcomes live: under (tenant, handle), one entry per batch index, each kept
    `ttl` seconds from its last write. Either may raise `errors.StoreUnavailable`."""

    async def record(self, rows: Sequence[Row]) -> None:
        """Keep each row's `data` as `entry` of its handle's record, replacing one so named: all
        at once (one transaction, one round trip)."""
        ...

    async def read(self, tenant: str, handle: str) -> list[bytes]:
        """Every entry of the handle's record, in any order; empty when none is kept."""
        ...


def request_handle(request_id: str) -> str:
    return f"request:{request_id}"


def key_handle(key: str) -> str:
    return f"key:{key}"


def identifier_text(recipient: Mapping[str, Any]) -> str:
    """One recipient's identifier as hashed: its kind and value (a Braze JSON recipient or the
    lookup's own); "" for none."""
    if recipient.get("external_user_id"):
        return f"external_user_id:{recipient['external_user_id']}"
    alias = recipient.get("user_alias")
    if isinstance(alias, Mapping) and (alias.get("alias_name") or alias.get("alias_label")):
        return f"user_alias:{alias.get('alias_label', '')}\x00{alias.get('alias_name', '')}"
    if recipient.get("email"):
        return f"email:{str(recipient['email']).lower()}"
    return ""


def _hash(salt: bytes, identifier: str) -> bytes:
    return hashlib.blake2b(identifier.encode(), key=salt, digest_size=HASH_BYTES).digest()


def recipient_hashes(body: bytes, salt: bytes) -> bytes:
    """The hashes of a batch body's recipients, in order, joined (HASH_BYTES each)."""
    keyed = hashlib.blake2b(key=salt, digest_size=HASH_BYTES)  # keyed once, copied per recipient
    hashes = []
    for recipient in orjson.loads(body).get("recipients") or ():
        one = keyed.copy()
        one.update(identifier_text(recipient).encode())
        hashes.append(one.digest())
    return b"".join(hashes)


@dataclass(frozen=True, slots=True)
class Origin:
    """Which request a kept result belongs to, and what was decided of it since."""

    request_id: str = ""
    key: str = ""
    replay: str = ""
    """The request id of the acknowledged `Replay` that sent the batch again; "" if none did."""

    def handles(self) -> list[str]:
        """The names the request's results are kept under."""
        return [request_handle(self.request_id)] + ([key_handle(self.key)] if self.key else [])


def encode(
    result: BatchResult, batch: Batch | None = None, origin: Origin = Origin(), salt: bytes | None = None
) -> bytes:
    """A result as kept: every field the caller was given, its recipients' hashes, its request;
    for an UNKNOWN batch (or one replayed), also the exact body sent, for `Replay`."""
    fields: dict[str, Any] = {name: getattr(result, name) for name in _FIELDS}
    fields["outcome"], fields["code"] = result.outcome.value, int(result.code)
    fields["positions"] = result.positions
    fields["errors"] = result.errors
    fields["violations"] = [(v.field, v.description, v.rule.value) for v in result.violations]
    fields["origin"] = (origin.request_id, origin.key, origin.replay)
    if batch is not None and batch.body:
        salt = salt if salt is not None else os.urandom(SALT_BYTES)
        fields["salt"] = salt.hex()
        fields["hashes"] = recipient_hashes(batch.body, salt).hex()
        if result.outcome is Outcome.UNKNOWN or origin.replay:
            fields["sent"] = (batch.body.decode(), batch.broadcast, batch.audience, batch.lane)
    return orjson.dumps(fields)


@dataclass(frozen=True, slots=True)
class Kept:
    """One kept result, what finds a recipient in it, and (UNKNOWN) the batch that was sent."""

    result: BatchResult
    salt: bytes = b""
    hashes: bytes = b""
    origin: Origin = Origin()
    batch: Batch | None = None
    """The batch as sent, kept for an UNKNOWN result (and after its replay); None otherwise."""

    def position_of(self, identifier: str) -> int | None:
        """The position of the recipient named by `identifier` (`identifier_text`), if in this batch."""
        if not self.salt or not identifier:
            return None
        wanted = _hash(self.salt, identifier)
        for offset, position in enumerate(self.result.positions):
            if self.hashes[offset * HASH_BYTES : (offset + 1) * HASH_BYTES] == wanted:
                return position
        return None


def decode(data: bytes) -> Kept:
    fields = orjson.loads(data)
    salt, hashes = bytes.fromhex(fields.pop("salt", "")), bytes.fromhex(fields.pop("hashes", ""))
    outcome, code = Outcome(fields.pop("outcome")), Code(fields.pop("code"))
    positions = tuple(fields.pop("positions"))
    errors = tuple(fields.pop("errors"))
    violations = tuple(Violation(f, d, Rule(r)) for f, d, r in fields.pop("violations"))
    origin = Origin(*fields.pop("origin", ()))
    sent = fields.pop("sent", None)
    result = BatchResult(
        positions=positions, outcome=outcome, code=code, errors=errors, violations=violations, **fields
    )
    batch = None
    if sent is not None:
        body, broadcast, audience, lane = sent
        batch = Batch(result.batch_index, positions, body.encode(), broadcast, audience, lane)
    return Kept(result, salt, hashes, origin, batch)


UNKNOWN_HANDLE: Final = "unknown"
"""The tenant's list of UNKNOWN batches not replayed yet: one entry per (request id, batch), in
a record per TTL-long span of time (`unknown:<span>`), so that each record stops being written
once its span is over and goes a TTL later: the list is bounded by what two spans hold."""


FLUSH_SECONDS: Final = 0.05
"""Kept outcomes are written behind the results, together, at most this long after they are made
(or as soon as FLUSH_ROWS wait): a write per batch would cost a thread hop or a round trip each."""
FLUSH_ROWS: Final = 512


class Recorder:
    """Keeps every result of a request under its handles, and reads them back (`OutcomeStore`).

    `record` never waits: what it is given is written behind, with what other batches made
    meanwhile, by one task (FLUSH_SECONDS); `flush` waits until what was recorded before it is
    written (a stream before its summary, a replay before it answers, a read, a shutdown; not a
    unary Send, which is answered at once: another process reads its results FLUSH_SECONDS
    later at the most). A write
    the store does not take is counted and logged, never fails a batch: the result still reaches
    its caller, and the reconciliation log line stands for it."""

    def __init__(
        self,
        store: OutcomeStore | None,
        metrics: Metrics | None = None,
        ttl: float = 86_400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._ttl = ttl
        """How long the store keeps results (CGW_IDEMPOTENCY_TTL_SECONDS): the UNKNOWN list's span."""
        self._clock = clock
        self._pending: list[Row] = []
        self._waiting: list[asyncio.Future[None]] = []
        self._now = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def record(self, context: RequestContext, result: BatchResult, batch: Batch | None = None) -> None:
        """Keep a result as it was made, under the request's id (and its key, unless replayed);
        a new UNKNOWN one also on the tenant's UNKNOWN list."""
        if self._store is None or not context.request_id:
            return
        key = context.key if context.scope is not None and not result.replayed else ""
        origin = Origin(context.request_id, key)
        listed = result.outcome is Outcome.UNKNOWN and not result.replayed
        self._keep(context.tenant.id, origin.handles(), result, batch, origin, listed)

    def record_replay(
        self, tenant: str, request_id: str, origin: Origin, result: BatchResult, batch: Batch
    ) -> None:
        """Keep a replayed batch's result under the replay's own `request_id`; when it was sent
        now (`origin.replay`), also in place of the UNKNOWN one, with the decision, and off the
        UNKNOWN list. The batch keeps its `origin`: every later replay claims it as the first did."""
        if origin.replay:
            self._keep(tenant, origin.handles(), result, batch, origin, True)
        self._keep(tenant, [request_handle(request_id)], result, batch, origin, False)

    def _keep(
        self,
        tenant: str,
        handles: list[str],
        result: BatchResult,
        batch: Batch | None,
        origin: Origin,
        listed: bool,
    ) -> None:
        data = encode(result, batch, origin)
        entry = str(result.batch_index)
        self._pending += [(tenant, handle, entry, data) for handle in handles]
        if listed:
            span = f"{UNKNOWN_HANDLE}:{int(self._clock() // self._ttl)}"
            self._pending.append((tenant, span, f"{origin.request_id}#{entry}", data))
        if len(self._pending) >= FLUSH_ROWS:
            self._now.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def flush(self) -> None:
        """Wait until every result recorded so far is written (or its write failed)."""
        if self._writer is None or self._writer.done():
            return
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        self._now.set()
        await asyncio.shield(done)

    async def _write(self) -> None:
        """The one writer: what waits, together, after FLUSH_SECONDS (or at once when asked)."""
        assert self._store is not None
        try:
            while self._pending:
                if not self._now.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._now.wait(), FLUSH_SECONDS)
                self._now.clear()
                rows, self._pending = self._pending, []
                waiting, self._waiting = self._waiting, []
                try:
                    await self._store.record(rows)
                except (StoreUnavailable, StoreLost) as exc:
                    for tenant, _, _, data in rows:
                        self._metrics.results_kept(tenant, "failed", len(data))
                    log.error("%d results were not kept for GetResults (%s)", len(rows), exc)
                else:
                    for tenant, _, _, data in rows:
                        self._metrics.results_kept(tenant, "kept", len(data))
                for done in waiting:  # what they waited for is written (or failed)
                    if not done.done():
                        done.set_result(None)
        finally:
            for done in self._waiting:
                if not done.done():
                    done.set_result(None)
            self._waiting = []

    async def read(self, tenant: str, handle: str) -> list[Kept]:
        """The handle's kept results in position order (an empty list: nothing kept)."""
        if self._store is None:
            return []
        await self.flush()
        kept = [decode(data) for data in await self._store.read(tenant, handle)]
        kept.sort(key=lambda item: (item.result.positions[:1] or (-1,), item.result.batch_index))
        return kept

    async def unknown(self, tenant: str) -> list[Kept]:
        """The tenant's UNKNOWN batches that no acknowledged replay has sent again (a replay's
        mark may be in the span after the batch's own)."""
        span = int(self._clock() // self._ttl)
        found: dict[tuple[str, int], Kept] = {}
        replayed: set[tuple[str, int]] = set()
        for handle in (f"{UNKNOWN_HANDLE}:{span - 1}", f"{UNKNOWN_HANDLE}:{span}"):
            for item in await self.read(tenant, handle):
                name = (item.origin.request_id, item.result.batch_index)
                if item.origin.replay:
                    replayed.add(name)
                else:
                    found[name] = item
        return [found[name] for name in sorted(found.keys() - replayed)]
