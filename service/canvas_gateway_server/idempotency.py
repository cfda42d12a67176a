"""Idempotency keys: a batch's final result is kept, so that sending again sends nothing twice.

Braze has no idempotency key (CONTRACT.md section 6): a trigger sent again is a second
message. A caller that gives a key (SendOptions.idempotency_key) has each batch claimed before
it is sent, under (tenant, key, batch index) with a digest of the batch's body, and its result
kept once it ends. A later call with the key:

- gets the kept result of a batch (`replayed`), and Braze is not called;
- gets REJECTED / FAILED_PRECONDITION for a batch whose body differs from the kept one;
- gets NOT_ATTEMPTED / ABORTED with a RetryInfo for a batch another call is still sending;
- gets UNKNOWN for a batch whose gateway stopped while its call may have left (it may have been
  sent); a batch whose gateway stopped before that (waiting for a slot, for budget, or for its
  connection to Braze) is claimed again and sent.

A claim records the moment its call may leave (`ResultStore.mark_sending`, asked by `upstream`
once the call has its connection and just before its first request is written): that is what
tells a dead claim that may have reached Braze (UNKNOWN for good) from one that cannot have
(released to the next call). A gateway killed between the mark and the bytes leaving (the mark's
round trip and a loop turn or two) leaves its batch UNKNOWN though it never left; several batches
can share that moment (marks issued together go to Redis in one write), never more than the calls
it had under way.

Only results of batches that may have been sent are kept: SENT and UNKNOWN. Every other result
says nothing was sent (NOT_ATTEMPTED, CANVAS_INACTIVE, REJECTED: a 429, a 401 for a wrong key, a
400...), and releases the claim, so a later call sends the batch, after whatever fix the result
asked for. `ResultStore` is where claims live: in this process (`stores.memory.LocalResults`, TTL, a capacity
shared fairly by tenants), in a file every worker of the host shares (`stores.host_results.HostResults`),
or in Redis for every replica (`stores.redis.RedisResults`). What the store did not take when asked (it
did not answer) is offered again by one background task per process (`Ledger`), backing off.

Just over ~300 lines, for a reason: the claim's verdicts, the `ResultStore` port and the
`Ledger` that alone speaks to it are one protocol, read best together.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Protocol

from . import keeping, results
from .context import IdempotencyScope
from .errors import StoreLost, StoreUnavailable
from .metrics import Metrics
from .model import Batch, BatchResult

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS: Final = 1.0
"""When a caller told that a batch is in flight elsewhere should try again."""
RETRY_BASE_SECONDS: Final = 0.2
RETRY_MAX_SECONDS: Final = 5.0
"""What the store did not take is offered again after 0.2 s, doubling to at most 5 s (each with
jitter) while it does not answer: one operation at a time, however many are waiting."""


class Verdict(enum.Enum):
    CLAIMED = "claimed"
    """Nothing kept: this call sends the batch, and must keep or release its result."""
    RECLAIMED = "reclaimed"
    """As CLAIMED: the claim before this one died before its call could leave."""
    KEPT = "kept"
    MISMATCH = "mismatch"
    BUSY = "busy"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Claim:
    verdict: Verdict
    kept: bytes | None = None
    """The kept result (KEPT; with MISMATCH, the result kept for the other body, if any)."""


class ResultStore(Protocol):
    """Claims and kept results, each under (scope, batch index); scope is tenant and key. A store
    that names entries in text uses `scope.text()`, and the tenant as `scope.tenant`: never the
    text parsed back. Any operation may raise `errors.StoreUnavailable` (no answer) or
    `errors.StoreLost`."""

    async def claim(self, scope: IdempotencyScope, index: int, digest: str, token: str) -> Claim:
        """Claim the batch as `token` unless it is kept, claimed, or has another digest.
        A claim whose process stopped (or that outlived the lease) is claimed again (RECLAIMED)
        if it never reached `mark_sending`, else becomes a kept UNKNOWN: LOST."""
        ...

    async def mark_sending(self, scope: IdempotencyScope, index: int, token: str) -> bool:
        """Record that the claim `token`'s call may leave now. False: the claim is no longer
        `token`'s (it lapsed and another call holds it), and the batch must not be sent."""
        ...

    async def keep(
        self, scope: IdempotencyScope, index: int, digest: str, token: str, kept: bytes | None
    ) -> None:
        """End the claim `token`: keep `kept` (unless another call's claim holds the batch); or
        (None) release the claim if it is still `token`'s, so that a later call sends the batch."""
        ...


@dataclass(frozen=True, slots=True)
class Claimed:
    """A batch this call sends; its result goes back to the store with `Ledger.keep`."""

    scope: IdempotencyScope
    """The tenant and key the batch is claimed under."""
    batch: Batch
    digest: str
    token: str
    """This claim's name: only it may release the claim."""


class Ledger:
    """The dispatcher's view of a `ResultStore`: a claim, the mark that its call may leave, and
    the result that stands for the batch.

    What the store does not take when asked (a result, or the release of a claim whose answer
    was lost) waits in one backlog, offered again by one task: one operation at a time, backing
    off exponentially (with jitter, capped) while the store does not answer, and at once when it
    answers anything again. The load it puts on a struggling store does not grow with failures.
    """

    def __init__(
        self,
        store: ResultStore,
        metrics: Metrics | None = None,
        *,
        lease: float,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._lease = lease
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._jitter = jitter
        self._backlog: dict[tuple[IdempotencyScope, int, str], tuple[Claimed, bytes | None, float]] = {}
        """(scope, index, token) -> the claim, what to keep (None: release) and until when."""
        self._failures = 0
        """The store's failures in a row: how long the backlog waits before it tries again."""
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def backlog(self) -> int:
        """Results and releases waiting for the store to take them."""
        return len(self._backlog)

    async def claim(self, scope: IdempotencyScope, batch: Batch) -> Claimed | BatchResult:
        """Claim the batch under `scope` for this call (`Claimed`: send it), or the result that
        stands for it (kept, refused, or busy elsewhere)."""
        claimed = Claimed(scope, batch, keeping.digest(batch), uuid.uuid4().hex)
        tenant = scope.tenant
        try:
            claim = await self._store.claim(claimed.scope, batch.index, claimed.digest, claimed.token)
        except StoreLost as exc:  # refused before anything was claimed
            self._metrics.idempotency(tenant, "refused")
            return results.keys_refused(batch, str(exc))
        except asyncio.CancelledError:
            # The caller went away while the claim was made (a stream cut off): the claim may
            # stand, so it is released now. The store did not fail: no backoff delays that, nor
            # the other releases of the cut-off call, which a resend meanwhile finds BUSY.
            self._offer(claimed, None)
            raise
        except StoreUnavailable as exc:
            # The claim may have been made with its answer lost: release it, once the store
            # answers. Nothing was sent.
            self._failed()
            self._offer(claimed, None)
            return results.store_unavailable(batch, 0, str(exc))
        self._answered()
        self._metrics.idempotency(tenant, claim.verdict.value)
        match claim.verdict:
            case Verdict.CLAIMED:
                return claimed
            case Verdict.RECLAIMED:
                log.warning(
                    "batch %d was claimed under its idempotency key by a gateway that stopped before "
                    "calling Braze: it is sent now",
                    batch.index,
                    extra={"tenant": tenant, "batch_index": batch.index},
                )
                return claimed
            case Verdict.KEPT:
                return keeping.decode(claim.kept or b"", batch)
            case Verdict.LOST:  # decided now (its gateway stopped first): counted once, as new
                lost = keeping.lost(batch)
                self._metrics.result(tenant, lost)
                return replace(lost, replayed=True)
            case Verdict.MISMATCH:
                return results.key_reused(batch, keeping.describe(claim.kept))
            case Verdict.BUSY:
                return results.key_busy(batch, time.time() + BUSY_RETRY_SECONDS)

    async def sending(self, claimed: Claimed) -> BatchResult | None:
        """Record that the batch's first call leaves now. None: send it; else the result that
        ends the batch unsent (the claim lapsed and another call holds it, or the store did not
        answer)."""
        try:
            ours = await self._store.mark_sending(claimed.scope, claimed.batch.index, claimed.token)
        except StoreLost as exc:
            return results.keys_refused(claimed.batch, str(exc))
        except StoreUnavailable as exc:
            self._failed()
            return results.store_unavailable(claimed.batch, 0, str(exc))
        self._answered()
        if ours:
            return None
        log.warning(
            "batch %d was not sent: its claim under the idempotency key lapsed and another call holds it",
            claimed.batch.index,
            extra={"tenant": claimed.scope.tenant, "batch_index": claimed.batch.index},
        )
        return results.key_busy(claimed.batch, time.time() + BUSY_RETRY_SECONDS)

    async def keep(self, claimed: Claimed, result: BatchResult) -> None:
        """Keep the result, or release the claim. While the store does not answer this waits in
        the backlog (for as long as the lease), so the claim does not stay in flight; the result
        is logged for reconciliation meanwhile."""
        data = keeping.encode(result) if keeping.kept(result) else None
        try:
            await self._store.keep(claimed.scope, claimed.batch.index, claimed.digest, claimed.token, data)
        except (StoreUnavailable, StoreLost):
            self._failed()
            self._metrics.reconcile(claimed.scope.tenant, "not_kept")
            log.error(
                "the result of batch %d is not kept yet under its idempotency key (the store does "
                "not answer): calls with the key get ABORTED for it until it is",
                claimed.batch.index,
                extra={
                    "tenant": claimed.scope.tenant,
                    "batch_index": claimed.batch.index,
                    "outcome": result.outcome.name,
                    "dispatch_id": result.dispatch_id or "-",
                },
            )
            self._offer(claimed, data)
        else:
            self._answered()

    def keep_soon(self, claimed: Claimed, sent: bool) -> None:
        """The call was cancelled: keep UNKNOWN if the batch may have gone out, else release it,
        through the backlog (the cancelled task cannot wait)."""
        if sent:
            result = keeping.lost(claimed.batch, keeping.CUT_OFF_TEXT)
        else:
            result = results.not_attempted(claimed.batch, "cancelled")
        self._metrics.result(claimed.scope.tenant, result)  # no caller reports it; repeats replay it
        self._offer(claimed, keeping.encode(result) if sent else None)

    def _failed(self) -> None:
        self._failures = max(self._failures, 1)

    def _answered(self) -> None:
        """The store answered: what waits in the backlog is offered again now."""
        if self._failures:
            self._failures = 0
            self._wake.set()

    def _offer(self, claimed: Claimed, data: bytes | None) -> None:
        """Leave `data` (None: the claim's release) to the backlog, for the lease at most."""
        key = (claimed.scope, claimed.batch.index, claimed.token)
        self._backlog[key] = (claimed, data, self._clock() + self._lease)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        elif not self._failures:
            self._wake.set()

    def _delay(self) -> float:
        if self._closing:
            return RETRY_BASE_SECONDS
        ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** min(self._failures - 1, 16))
        return ceiling * (0.5 + self._jitter() / 2)

    async def _drain(self) -> None:
        """The backlog's one task: offer each waiting operation, oldest first; after a failure,
        wait (backing off) before the next try, or until the store answers another call."""
        while self._backlog:
            if self._failures:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._delay())
            key, (claimed, data, until) = next(iter(self._backlog.items()))
            if self._clock() >= until:
                del self._backlog[key]
                self._metrics.reconcile(claimed.scope.tenant, "never_kept")
                log.error(
                    "the result of batch %d was never kept: its claim lapses into UNKNOWN",
                    claimed.batch.index,
                    extra={"tenant": claimed.scope.tenant, "batch_index": claimed.batch.index},
                )
                continue
            try:
                await self._store.keep(
                    claimed.scope, claimed.batch.index, claimed.digest, claimed.token, data
                )
            except (StoreUnavailable, StoreLost):
                self._failures += 1
                continue
            self._failures = 0
            self._backlog.pop(key, None)
            if data is not None:
                log.info(
                    "the result of batch %d is kept now",
                    claimed.batch.index,
                    extra={"tenant": claimed.scope.tenant},
                )

    async def settled(self, within: float) -> None:
        """Wait up to `within` seconds for the backlog to be taken (at shutdown, trying every
        RETRY_BASE_SECONDS); what is still not kept then lapses into UNKNOWN with its claim."""
        self._closing = True
        self._wake.set()
        if self._drainer is not None and not self._drainer.done():
            await asyncio.wait({self._drainer}, timeout=within)
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
