"""Which stores a gateway uses, chosen from its settings, and their lifecycle as one.

- Redis (CGW_REDIS_URL): kept results and budgets shared by every replica; the budgets fail
  open to the host's (CGW_REDIS_FAILURE=open) or closed.
- Else kept results in the host's file (shared by its workers, kept across restarts), or, for
  one process on port 0, in this process's memory; budgets in the file the host's workers map,
  or in memory for a single process.

`app` asks for `Stores` and never sees which: it imports no Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from ..errors import ConfigError
from ..idempotency import ResultStore
from ..metrics import Metrics
from ..outcomes import OutcomeStore
from ..rate_budget import BudgetStore
from ..settings import Settings, State, WorkerRole
from . import host_results
from .failover import FailoverBudgets
from .host_budgets import HostBudgets, budgets_path
from .memory import LocalResults, TableBudgets
from .redis import RedisBudgets, RedisResults, acknowledge_loss, connect
from .resp import LeanRedis, ReplyError

log = logging.getLogger(__name__)

LEASE_MARGIN_SECONDS: Final = 10.0
"""A Redis reservation of a budget outlives the longest Braze call by this much: a replica that
dies with calls under way holds the budget no longer."""


class RunningStore(ResultStore, OutcomeStore, Protocol):
    """A results store as the gateway runs it: with background work (a heartbeat, a sweep)."""

    def start(self, on_failure: Callable[[], None]) -> None:
        """Begin the background work; `on_failure` is called each time a heartbeat is not taken."""
        ...

    async def stop(self) -> None:
        """End the background work and let go of what this process holds; safe without `start`."""
        ...


@dataclass
class Stores:
    """The results store and the budget store of one gateway process, started and stopped together."""

    results: RunningStore
    budgets: BudgetStore
    _stops: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    _redis: LeanRedis | None = None

    async def start(self, metrics: Metrics) -> None:
        """Start the results store's background work, and say whether Redis answers (a gateway
        starts either way: CGW_REDIS_FAILURE applies)."""
        self.results.start(lambda: metrics.store_failure("results", "heartbeat"))
        if self._redis is None:
            return
        try:
            await self._redis.ping()
        except (ReplyError, OSError, TimeoutError) as exc:
            log.error(
                "Redis (CGW_REDIS_URL) does not answer (%s): CGW_REDIS_FAILURE applies", type(exc).__name__
            )
        else:
            log.info("Redis (CGW_REDIS_URL) answers: budgets and idempotency keys are shared")

    async def stop(self) -> None:
        """Stop every store, in order (results, budgets, the connection); safe without `start`."""
        await self.results.stop()
        for stop in self._stops:
            await stop()


def open_stores(settings: Settings, worker: WorkerRole | None, metrics: Metrics) -> Stores:
    """The stores the settings ask for (of a worker: beside its supervisor's), connecting nothing yet."""
    state = settings.state
    local = TableBudgets(HostBudgets(budgets_path(worker.folder)) if worker is not None else None)
    client = connect_redis(state)
    if client is not None:
        lease = settings.upstream.timeout_seconds + LEASE_MARGIN_SECONDS  # the longest call, and then some
        fallback = local if state.redis_failure == "open" else None
        shared = RedisBudgets(client, lease)
        budgets = FailoverBudgets(shared, fallback, metrics)
        results = RedisResults(
            client, state.idempotency_ttl_seconds, state.idempotency_lease_seconds, metrics
        )
        return Stores(results, budgets, [budgets.stop, shared.stop, client.aclose], client)
    return Stores(_own_results(settings, worker, metrics), local)


def _own_results(settings: Settings, worker: WorkerRole | None, metrics: Metrics) -> RunningStore:
    """Without Redis: the host's file, shared by its workers and kept across restarts; else (one
    process on port 0) this process's memory."""
    state = settings.state
    path = host_results.keys_file(state, settings.listen.grpc_port)
    if path:
        if worker is None:  # a worker's file is the supervisor's, made before it started
            host_results.create(path, private_folder=not state.idempotency_file)
        return host_results.HostResults(path, state.idempotency_ttl_seconds, state.idempotency_lease_seconds)
    return LocalResults(
        state.idempotency_ttl_seconds,
        state.idempotency_capacity,
        state.idempotency_lease_seconds,
        on_evict=lambda tenant: metrics.idempotency(tenant, "evicted"),
        on_evict_outcome=metrics.results_evicted,
    )


def connect_redis(state: State) -> LeanRedis | None:
    """The client of CGW_REDIS_URL (None without one), connecting nothing yet. A URL redis-py
    refuses, or takes but would fail on at every command (an unknown query parameter), is a
    ConfigError that never quotes it (redis-py's own text may, and with it a password)."""
    if not state.redis_url:
        return None
    try:
        client = connect(state.redis_url, state.redis_timeout_seconds)
    except (ValueError, TypeError):
        raise ConfigError(
            "CGW_REDIS_URL is refused by redis-py: a query parameter it does not know, or a value it "
            "cannot read (see docs/configuration.md)"
        ) from None
    return client


async def accept_lost_keys(state: State) -> str:
    """What --accept-lost-keys prints, once Redis took the acknowledgement."""
    if not state.redis_url:
        raise ConfigError("--accept-lost-keys needs CGW_REDIS_URL: keys are kept in Redis only then")
    client = connect(state.redis_url, max(state.redis_timeout_seconds, 5.0))
    try:
        return await acknowledge_loss(client)
    except (ReplyError, OSError, TimeoutError) as exc:
        raise ConfigError(f"Redis (CGW_REDIS_URL) did not answer ({type(exc).__name__})") from None
    finally:
        await client.aclose()
