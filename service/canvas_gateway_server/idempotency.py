"""Idempotency keys: a batch's final result is kept, so that sending again sends nothing twice.

Braze has no idempotency key (CONTRACT.md section 6): a trigger sent again is a second
message. A caller that gives a key (SendOptions.idempotency_key) has each batch claimed before
it is sent, under (tenant, key, batch index) with a digest of the batch's body, and its result
kept once it ends. A later call with the key:

- gets the kept result of a batch (`replayed`), and Braze is not called;
- gets REJECTED / FAILED_PRECONDITION for a batch whose body differs from the kept one;
- gets NOT_ATTEMPTED / ABORTED with a RetryInfo for a batch another call is still sending;
- gets UNKNOWN for a batch whose gateway stopped while it was in flight (it may have been sent).

Only results that must not be sent again are kept: SENT, UNKNOWN and REJECTED that is not
retryable. NOT_ATTEMPTED, CANVAS_INACTIVE (nothing was sent) and retryable REJECTED (a 429)
release the claim, so a later call sends them. `ResultStore` is where claims live: in this
process (`LocalResults`, TTL and LRU) or in Redis for every replica (`shared.RedisResults`).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

import orjson

from . import results
from .limits import StoreUnavailable
from .metrics import Metrics
from .model import Batch, BatchResult, Code, Outcome
from .tenants import Tenant

log = logging.getLogger(__name__)

DEFAULT_TTL: Final = 24 * 3600.0
"""CGW_IDEMPOTENCY_TTL_SECONDS: how long a kept result answers for its key."""
DEFAULT_CAPACITY: Final = 200_000
"""CGW_IDEMPOTENCY_CAPACITY: batches the in-process store keeps (10 million recipients)."""
DEFAULT_LEASE: Final = 900.0
"""CGW_IDEMPOTENCY_LEASE_SECONDS: the longest a claim counts as in flight while its process runs."""
CUT_OFF_TEXT: Final = (
    "outcome unknown: the call that sent this batch under this idempotency key was cut off (its "
    "caller went away) while Braze was being called; it is not sent again"
)
BUSY_RETRY_SECONDS: Final = 1.0
KEEP_RETRY_SECONDS: Final = 1.0
"""How often a result the store did not take is offered again."""
"""When a caller told that a batch is in flight elsewhere should try again."""
LOST_TEXT: Final = (
    "outcome unknown: an earlier call under this idempotency key was sending this batch when its "
    "gateway stopped; it is not sent again"
)


class Verdict(enum.Enum):
    CLAIMED = "claimed"
    """Nothing kept: this call sends the batch, and must keep or release its result."""
    KEPT = "kept"
    MISMATCH = "mismatch"
    BUSY = "busy"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Claim:
    verdict: Verdict
    kept: bytes = b""
    """The kept result (KEPT)."""


class ResultStore(Protocol):
    """Claims and kept results, each under (scope, batch index); scope is tenant and key."""

    async def claim(self, scope: str, index: int, digest: str, token: str) -> Claim:
        """Claim the batch as `token` unless it is kept, claimed, or has another digest.
        A claim whose process stopped (or that outlived the lease) becomes a kept UNKNOWN: LOST."""
        ...

    async def keep(self, scope: str, index: int, digest: str, token: str, kept: bytes | None) -> None:
        """End the claim `token`: keep `kept`; or (None) release the claim if it is still
        `token`'s, so that a later call sends the batch."""
        ...


@dataclass(slots=True)
class _Entry:
    digest: str
    expires: float
    kept: bytes | None = None
    """None while claimed."""
    claimed_at: float = 0.0
    token: str = ""


class LocalResults:
    """This process's claims and results: kept `ttl` seconds, the `capacity` most recent.

    Past the capacity the least recently used entry is forgotten (counted in
    canvas_gateway_idempotency_total{verdict="evicted"}): a key's guarantee lasts as long as its
    entries are kept. Every claim is this process's, so a claim is BUSY until it ends or its
    lease runs out (then LOST)."""

    def __init__(
        self,
        ttl: float,
        capacity: int,
        lease: float,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] = lambda tenant: None,
    ) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._lease = lease
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[tuple[str, int], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def claim(self, scope: str, index: int, digest: str, token: str) -> Claim:
        now = self._clock()
        key = (scope, index)
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            del self._entries[key]
            entry = None
        if entry is None:
            self._entries[key] = _Entry(digest, now + self._ttl, claimed_at=now, token=token)
            while len(self._entries) > self._capacity:
                (evicted, _), _ = self._entries.popitem(last=False)
                self._on_evict(evicted.partition("/")[0])
            return Claim(Verdict.CLAIMED)
        self._entries.move_to_end(key)
        if entry.digest != digest:
            return Claim(Verdict.MISMATCH)
        if entry.kept is not None:
            return Claim(Verdict.KEPT, entry.kept)
        if now - entry.claimed_at < self._lease:
            return Claim(Verdict.BUSY)
        entry.kept = b""
        return Claim(Verdict.LOST)

    async def keep(self, scope: str, index: int, digest: str, token: str, kept: bytes | None) -> None:
        key = (scope, index)
        entry = self._entries.get(key)
        if kept is None:
            if entry is not None and entry.kept is None and entry.token == token:
                del self._entries[key]
            return
        self._entries[key] = _Entry(digest, self._clock() + self._ttl, kept)
        self._entries.move_to_end(key)


def digest(batch: Batch) -> str:
    """What a batch is: its body (canvas, context, recipients in order) as sent to Braze."""
    return hashlib.blake2b(batch.body, digest_size=16).hexdigest()


def kept(result: BatchResult) -> bool:
    """Whether a result must be kept: sending the batch again could message someone twice, or
    would be refused the same way. The others are sent again by a later call."""
    if result.outcome in (Outcome.SENT, Outcome.UNKNOWN):
        return True
    return result.outcome is Outcome.REJECTED and not result.retryable


_FIELDS: Final = (
    "status_message",
    "retryable",
    "dispatch_id",
    "message",
    "notice",
    "errors",
    "http_status",
    "attempts",
)


def encode(result: BatchResult) -> bytes:
    fields: dict[str, Any] = {name: getattr(result, name) for name in _FIELDS}
    fields["outcome"], fields["code"] = result.outcome.value, int(result.code)
    return orjson.dumps(fields)


def decode(data: bytes, batch: Batch) -> BatchResult:
    """A kept result as this batch's (its index and positions are this call's)."""
    if not data:  # LOST: kept as UNKNOWN without a result
        return replace(_lost(batch), replayed=True)
    fields = orjson.loads(data)
    outcome, code = Outcome(fields.pop("outcome")), Code(fields.pop("code"))
    fields["errors"] = tuple(fields["errors"])
    return BatchResult(batch.index, batch.positions, outcome, code, replayed=True, **fields)


def _lost(batch: Batch, text: str = LOST_TEXT) -> BatchResult:
    return BatchResult(batch.index, batch.positions, Outcome.UNKNOWN, Code.UNKNOWN, text)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A batch this call sends; its result goes back to the store with `Ledger.keep`."""

    tenant: Tenant
    scope: str
    batch: Batch
    digest: str
    token: str
    """This claim's name: only it may release the claim."""


class Ledger:
    """The dispatcher's view of a `ResultStore`: a claim, or the result that stands for the batch."""

    def __init__(
        self, store: ResultStore, metrics: Metrics | None = None, lease: float = DEFAULT_LEASE
    ) -> None:
        self._store = store
        self._lease = lease
        self._metrics = metrics or Metrics()
        self._pending: set[asyncio.Task[None]] = set()

    async def claim(self, tenant: Tenant, key: str, batch: Batch) -> Claimed | BatchResult:
        claimed = Claimed(tenant, f"{tenant.id}/{key}", batch, digest(batch), uuid.uuid4().hex)
        try:
            claim = await self._store.claim(claimed.scope, batch.index, claimed.digest, claimed.token)
        except (StoreUnavailable, asyncio.CancelledError) as exc:
            # The claim may have been made with its answer lost (or the caller gone while it was
            # made): release it, once the store answers. Nothing was sent.
            self._later(self._keep_until_kept(claimed, None))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return results.store_unavailable(batch, 0, str(exc))
        self._metrics.idempotency(tenant.id, claim.verdict.value)
        match claim.verdict:
            case Verdict.CLAIMED:
                return claimed
            case Verdict.KEPT:
                return decode(claim.kept, batch)
            case Verdict.LOST:  # decided now (its gateway stopped first): counted once, as new
                lost = _lost(batch)
                self._metrics.result(tenant.id, lost)
                return replace(lost, replayed=True)
            case Verdict.MISMATCH:
                return results.key_reused(batch)
            case Verdict.BUSY:
                return results.key_busy(batch, time.time() + BUSY_RETRY_SECONDS)

    async def keep(self, claimed: Claimed, result: BatchResult) -> None:
        """Keep the result, or release the claim. While the store does not answer this goes on
        in the background (every KEEP_RETRY_SECONDS, for as long as the lease), so the claim
        does not stay in flight; the result is logged for reconciliation meanwhile."""
        data = encode(result) if kept(result) else None
        try:
            await self._store.keep(claimed.scope, claimed.batch.index, claimed.digest, claimed.token, data)
        except StoreUnavailable:
            log.error(
                "the result of batch %d is not kept yet under its idempotency key (the store does "
                "not answer): calls with the key get ABORTED for it until it is",
                claimed.batch.index,
                extra={
                    "tenant": claimed.tenant.id,
                    "batch_index": claimed.batch.index,
                    "outcome": result.outcome.name,
                    "dispatch_id": result.dispatch_id or "-",
                },
            )
            self._later(self._keep_until_kept(claimed, data))

    async def _keep_until_kept(self, claimed: Claimed, data: bytes | None) -> None:
        """Offer `data` (None: the claim's release) until the store takes it, for the lease."""
        deadline = time.monotonic() + self._lease
        while time.monotonic() < deadline:
            try:
                await self._store.keep(
                    claimed.scope, claimed.batch.index, claimed.digest, claimed.token, data
                )
            except StoreUnavailable:
                await asyncio.sleep(KEEP_RETRY_SECONDS)
                continue
            if data is not None:
                log.info(
                    "the result of batch %d is kept now",
                    claimed.batch.index,
                    extra={"tenant": claimed.tenant.id},
                )
            return
        log.error(
            "the result of batch %d was never kept: its claim lapses into UNKNOWN",
            claimed.batch.index,
            extra={"tenant": claimed.tenant.id, "batch_index": claimed.batch.index},
        )

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def keep_soon(self, claimed: Claimed, sent: bool) -> None:
        """The call was cancelled: keep UNKNOWN if the batch may have gone out, else release it,
        in a task of its own (the cancelled one cannot wait)."""
        if sent:
            result = _lost(claimed.batch, CUT_OFF_TEXT)
        else:
            result = results.not_attempted(claimed.batch, "cancelled")
        self._metrics.result(claimed.tenant.id, result)  # no caller reports it; repeats replay it
        self._later(self.keep(claimed, result))

    async def settled(self, within: float) -> None:
        """Wait up to `within` seconds for the results kept in the background (at shutdown);
        what is still not kept then lapses into UNKNOWN with its claim."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=within)
        for task in self._pending:
            task.cancel()
