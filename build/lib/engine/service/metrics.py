"""Prometheus metrics of the engine through prometheus_client: the engine's counters and
latency histograms are read at each scrape; process, platform and GC metrics come with it."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Families", "Histogram", "Metric", "registry", "render"]

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram:
    """Cumulative-bucket histogram of seconds, as Prometheus expects."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """Upper bucket bound below which a fraction ``q`` of observations fall."""
        if self.count == 0:
            return None
        target = q * self.count
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            if running >= target:
                return bound
        return float("inf")


class Families:
    """The engine's metrics of one scrape, as prometheus_client metric families."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def metric(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float | int]],
    ) -> None:
        rows = list(samples)
        label_names = sorted(rows[0][0]) if rows else []
        family: CounterMetricFamily | GaugeMetricFamily
        if kind == "counter":
            family = CounterMetricFamily(name, help_text, labels=label_names)
        else:
            family = GaugeMetricFamily(name, help_text, labels=label_names)
        for labels, value in rows:
            family.add_metric([labels[k] for k in label_names], value)
        self.families.append(family)

    def histogram(self, name: str, help_text: str, hist: Histogram, labels: dict[str, str]) -> None:
        label_names = sorted(labels)
        found = next((f for f in self.families if f.name == name), None)
        family = found if isinstance(found, HistogramMetricFamily) else None
        if family is None:
            family = HistogramMetricFamily(name, help_text, labels=label_names)
            self.families.append(family)
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        family.add_metric([labels[k] for k in label_names], buckets, hist.sum)


class _Scrape(Collector):
    def __init__(self, build: Callable[[], list[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterator[Metric]:
        yield from self._build()


def registry(build: Callable[[], list[Metric]]) -> CollectorRegistry:
    """A registry of its own (one per engine): the engine's metrics, built by ``build`` at
    each scrape, and the process, platform and garbage-collector metrics prometheus_client
    provides."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Scrape(build))
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
