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
process (`LocalResults`, TTL, a capacity shared fairly by tenants), in a file every worker of
the host shares (`host_results.HostResults`), or in Redis for every replica (`shared.RedisResults`).
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
DEFAULT_CAPACITY: Final = 50_000
"""CGW_IDEMPOTENCY_CAPACITY: batches the in-process store keeps (2.5 million recipients, about
30 MB: it fits deploy/k8s' memory limit beside the gateway's own 60 MB)."""
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
class _Kept:
    digest: str
    expires: float
    kept: bytes
    """b"" for a claim found LOST (kept as UNKNOWN)."""


@dataclass(slots=True)
class _Claimed:
    digest: str
    claimed_at: float
    token: str


SWEEP_SECONDS: Final = 1.0
"""How often `LocalResults` frees what has expired, whether or not its key is used again."""


class LocalResults:
    """This process's claims and results: each kept `ttl` seconds, at most `capacity` in all.

    What an entry holds is sized (BENCHMARKS.md, `bench/memory.py`: about 0.6 KB with a SENT
    result; orjson's output is copied to its length, since its buffer is 4 KB). Expired entries
    are freed every SWEEP_SECONDS by `start`'s task (and a lookup never answers with one).
    Past the capacity the oldest kept result goes first (every entry lives `ttl` from its keep,
    so the oldest is also the one nearest its end), counted in
    canvas_gateway_idempotency_total{verdict="evicted"}, and a key's guarantee lasts as long as
    its entries are kept; but:

    - claims in flight are never evicted (they are bounded by the concurrency; the store may
      hold more than `capacity` while they are);
    - a result is evicted from the tenant that holds the most entries, so a tenant holding no
      more than its share (capacity / the tenants holding entries) loses none to another's
      traffic.

    Every claim is this process's, so a claim is BUSY until it ends or its lease runs out
    (then LOST)."""

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
        self._kept: dict[str, OrderedDict[tuple[str, int], _Kept]] = {}
        """Per tenant, in the order kept: oldest (and first to expire) first."""
        self._claims: dict[tuple[str, int], _Claimed] = {}
        self._held: dict[str, int] = {}
        """Entries (kept and claimed) per tenant."""
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return sum(self._held.values())

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    async def claim(self, scope: str, index: int, digest: str, token: str) -> Claim:
        now = self._clock()
        key, tenant = (scope, index), _tenant(scope)
        entries = self._kept.get(tenant)
        kept = entries.get(key) if entries is not None else None
        if kept is not None and kept.expires > now:
            if kept.digest != digest:
                return Claim(Verdict.MISMATCH)
            return Claim(Verdict.KEPT, kept.kept)
        claimed = self._claims.get(key)
        if claimed is not None and claimed.claimed_at + self._ttl > now:
            if claimed.digest != digest:
                return Claim(Verdict.MISMATCH)
            if now - claimed.claimed_at < self._lease:
                return Claim(Verdict.BUSY)
            self._put(tenant, key, _Kept(digest, now + self._ttl, b""))
            return Claim(Verdict.LOST)
        self._drop(tenant, key)  # an expired entry, if any
        self._claims[key] = _Claimed(digest, now, token)
        self._held[tenant] = self._held.get(tenant, 0) + 1
        self._evict()
        return Claim(Verdict.CLAIMED)

    async def keep(self, scope: str, index: int, digest: str, token: str, kept: bytes | None) -> None:
        key, tenant = (scope, index), _tenant(scope)
        if kept is None:
            claimed = self._claims.get(key)
            if claimed is not None and claimed.token == token:
                self._drop(tenant, key)
            return
        # Copied to its length: orjson's bytes keep their whole (4 KB) buffer.
        self._put(tenant, key, _Kept(digest, self._clock() + self._ttl, bytes(memoryview(kept))))
        self._evict()

    def _put(self, tenant: str, key: tuple[str, int], kept: _Kept) -> None:
        self._drop(tenant, key)
        self._kept.setdefault(tenant, OrderedDict())[key] = kept
        self._held[tenant] = self._held.get(tenant, 0) + 1

    def _drop(self, tenant: str, key: tuple[str, int]) -> None:
        gone = self._claims.pop(key, None) is not None
        kept = self._kept.get(tenant)
        if kept is not None and kept.pop(key, None) is not None:
            gone = True
            if not kept:
                del self._kept[tenant]
        if gone:
            self._forget(tenant, 1)

    def _forget(self, tenant: str, count: int) -> None:
        self._held[tenant] -= count
        if not self._held[tenant]:
            del self._held[tenant]

    def _evict(self) -> None:
        excess = len(self) - self._capacity
        while excess > 0 and self._kept:
            tenant = max(self._kept, key=self._held.__getitem__)
            entries = self._kept[tenant]
            entries.popitem(last=False)
            if not entries:
                del self._kept[tenant]
            self._forget(tenant, 1)
            self._on_evict(tenant)
            excess -= 1

    def expire(self) -> int:
        """Free every entry past its time (kept results past the TTL, claims past the TTL); how
        many. Kept results expire in the order kept, so this reads only what it frees."""
        now = self._clock()
        freed = 0
        for tenant in list(self._kept):
            entries = self._kept[tenant]
            count = 0
            while entries and next(iter(entries.values())).expires <= now:
                entries.popitem(last=False)
                count += 1
            if not entries:
                del self._kept[tenant]
            if count:
                self._forget(tenant, count)
                freed += count
        for key in [key for key, claimed in self._claims.items() if claimed.claimed_at + self._ttl <= now]:
            del self._claims[key]
            self._forget(_tenant(key[0]), 1)
            freed += 1
        return freed

    def start(self) -> None:
        """Free expired entries every SWEEP_SECONDS until `stop`."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.expire()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)


def _tenant(scope: str) -> str:
    return scope.partition("/")[0]


def digest(batch: Batch) -> str:
    """What a batch is: its body (canvas, context, recipients in order) as sent to Braze.

    The body is canonical JSON (`validate` sorts keys at every depth; the head's keys all sort
    before `recipients`, which `batching` appends last): map entries in any order, decoded in
    any process, give one body and one digest (tests/test_digest.py)."""
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
