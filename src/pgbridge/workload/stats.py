"""Latency bookkeeping for the workload: per-transaction samples, percentiles, rates.

Pure and thread-safe: workers `record`, the dashboard takes `window()` snapshots every second and
the end of a run takes `summary()`. Samples are kept whole (a run at a few hundred transactions
per second for minutes is a few hundred thousand floats), so percentiles are exact.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Summary:
    seconds: float
    transactions: int
    tps: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # committed, rejected (out of stock), error, ...
    errors: dict[str, int] = field(default_factory=dict)  # first line of each distinct error

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


class Recorder:
    """Collects (kind, start, latency, outcome) from many threads."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: list[tuple[str, float, float]] = []  # kind, end time, latency in seconds
        self._outcomes: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self.started = clock()
        self.stopped: float | None = None

    def record(self, kind: str, latency_s: float, outcome: str = "committed", *, at: float | None = None) -> None:
        end = self._clock() if at is None else at
        with self._lock:
            self._samples.append((kind, end, latency_s))
            self._outcomes[outcome] += 1

    def error(self, kind: str, message: str) -> None:
        with self._lock:
            self._outcomes["error"] += 1
            self._errors[f"{kind}: {message.strip().splitlines()[0] if message.strip() else '?'}"[:200]] += 1

    def stop(self) -> None:
        self.stopped = self._clock()

    def totals(self) -> dict[str, Any]:
        """Counts since the start, cheap enough to ask every second of a long run."""
        with self._lock:
            return {
                "transactions": len(self._samples),
                "outcomes": dict(self._outcomes),
                "errors": dict(self._errors.most_common(3)),
            }

    def window(self, seconds: float) -> Summary:
        """The last `seconds` of samples (what a dashboard shows)."""
        now = self._clock() if self.stopped is None else self.stopped
        with self._lock:
            recent = [s for s in self._samples[-200_000:] if s[1] > now - seconds]
        span = min(seconds, max(now - self.started, 1e-9))
        return self._summarise(recent, span, Counter(), Counter())

    def summary(self) -> Summary:
        end = self._clock() if self.stopped is None else self.stopped
        with self._lock:
            samples = list(self._samples)
            outcomes, errors = Counter(self._outcomes), Counter(self._errors)
        return self._summarise(samples, max(end - self.started, 1e-9), outcomes, errors)

    @staticmethod
    def _summarise(
        samples: list[tuple[str, float, float]], span: float, outcomes: Counter[str], errors: Counter[str]
    ) -> Summary:
        lat = sorted(s[2] for s in samples)
        kinds: dict[str, list[float]] = {}
        for kind, _, latency in samples:
            kinds.setdefault(kind, []).append(latency)
        by_kind = {}
        for kind, values in sorted(kinds.items()):
            values.sort()
            by_kind[kind] = {
                "count": len(values),
                "p50_ms": _ms(percentile(values, 50)),
                "p99_ms": _ms(percentile(values, 99)),
            }
        return Summary(
            seconds=round(span, 2),
            transactions=len(lat),
            tps=round(len(lat) / span, 1),
            p50_ms=_ms(percentile(lat, 50)),
            p99_ms=_ms(percentile(lat, 99)),
            max_ms=_ms(lat[-1] if lat else None),
            by_kind=by_kind,
            outcomes=dict(outcomes),
            errors=dict(errors.most_common(10)),
        )
