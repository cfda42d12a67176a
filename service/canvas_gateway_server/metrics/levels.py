"""The collector of the gauges that move on every batch: streams open, batches in flight, results
buffered, Braze's rate-limit headers and pauses, kept as plain numbers and read at scrape time."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class Levels(Collector):
    """Gauges that move on every batch, kept as plain numbers and read at scrape time.

    A prometheus_client gauge takes a lock per change; these change several times per batch,
    so the hot path only updates dicts (one event loop thread writes them) and `collect`
    turns them into samples. Pauses are judged against the clock at scrape time.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.streams: defaultdict[str, int] = defaultdict(int)
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.buffered: defaultdict[str, int] = defaultdict(int)
        self.remaining: dict[tuple[str, str], int] = {}
        self.limit: dict[tuple[str, str], int] = {}
        self.paused_until: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterator[Metric]:
        yield _by_tenant("canvas_gateway_streams_open", "SendStream calls open.", self.streams)
        yield _by_tenant(
            "canvas_gateway_batches_in_flight",
            "Batches waiting for a rate-limit slot or calling Braze.",
            self.in_flight,
        )
        yield _by_tenant(
            "canvas_gateway_results_buffered",
            "Results waiting in streams' queues for their callers to read them.",
            self.buffered,
        )
        yield _by_budget(
            "canvas_gateway_braze_ratelimit_remaining",
            "The last x-ratelimit-remaining Braze sent for the tenant's budget.",
            self.remaining,
        )
        yield _by_budget(
            "canvas_gateway_braze_ratelimit_limit",
            "The last x-ratelimit-limit Braze sent for the tenant's budget.",
            self.limit,
        )
        now = self._clock()
        active = {key: until for key, until in self.paused_until.items() if until > now}
        yield _by_budget(
            "canvas_gateway_tenant_paused",
            "1 while the tenant's Braze budget is spent and no call is made until its reset.",
            {key: 1 if key in active else 0 for key in self.paused_until},
        )
        yield _by_budget(
            "canvas_gateway_tenant_paused_until_timestamp_seconds",
            "When the tenant's pause ends (epoch seconds); 0 when it is not paused.",
            {key: active.get(key, 0.0) for key in self.paused_until},
        )


def _by_tenant(name: str, doc: str, values: Mapping[str, int]) -> Metric:
    """A gauge family from {tenant: value}."""
    family = GaugeMetricFamily(name, doc, labels=("tenant",))
    for tenant, number in sorted(values.items()):
        family.add_metric((tenant,), float(number))
    return family


def _by_budget(name: str, doc: str, values: Mapping[tuple[str, str], float]) -> Metric:
    """A gauge family from {(tenant, budget): value}."""
    family = GaugeMetricFamily(name, doc, labels=("tenant", "budget"))
    for key, number in sorted(values.items()):
        family.add_metric(key, float(number))
    return family
