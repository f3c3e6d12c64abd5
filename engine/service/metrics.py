"""Prometheus text exposition for the engine's counters and latency histograms (no I/O)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

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


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    """Builds one Prometheus text-format page."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def metric(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float | int]],
    ) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self._lines.append(f"{name}{_labels(labels)} {value}")

    def histogram(self, name: str, help_text: str, hist: Histogram, labels: dict[str, str]) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} histogram")
        running = 0
        for bound, n in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            self._lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
        self._lines.append(f"{name}_sum{_labels(labels)} {hist.sum}")
        self._lines.append(f"{name}_count{_labels(labels)} {hist.count}")

    def render(self) -> bytes:
        return ("\n".join(self._lines) + "\n").encode()
