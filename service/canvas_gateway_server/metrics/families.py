"""Labelled metrics with their children cached, the way every concern here registers its families."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

M = TypeVar("M", Counter, Gauge, Histogram)


class Family(Generic[M]):
    """A labelled metric with its children cached: `labels()` costs a lock and a tuple each time."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


def counter(registry: CollectorRegistry, name: str, doc: str, labels: tuple[str, ...]) -> Family[Counter]:
    """A labelled counter on `registry`."""
    return Family(Counter(name, doc, labels, registry=registry))
