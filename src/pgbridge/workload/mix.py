"""What the shop's users do, and when: the transaction mix and the open-loop schedule (pure).

The generator asks `Mix.pick` which transaction to run next and `Schedule.due` when; both are
deterministic for a seed, so tests can check the proportions and the pacing without a database.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from pgbridge.errors import UsageError

# Weights of each kind of transaction, out of their sum. Searches and browsing dominate a real
# shop; orders are a quarter; payment updates follow orders; cancellations and refunds are rare.
DEFAULT_MIX: tuple[tuple[str, int], ...] = (
    ("register", 6),
    ("search", 34),
    ("add_to_cart", 12),
    ("place_order", 24),
    ("pay", 14),
    ("ship", 5),
    ("cancel", 2),
    ("refund", 2),
    ("restock", 1),
)
MAX_RATE = 20_000.0


class Mix:
    def __init__(self, weights: tuple[tuple[str, int], ...] = DEFAULT_MIX) -> None:
        if not weights or any(w <= 0 for _, w in weights):
            raise ValueError("every transaction kind needs a positive weight")
        self.kinds = [k for k, _ in weights]
        self._cumulative = list(itertools.accumulate(w for _, w in weights))

    def pick(self, rng: random.Random) -> str:
        x = rng.random() * self._cumulative[-1]
        return self.kinds[bisect.bisect_right(self._cumulative, x)]

    def share(self, kind: str) -> float:
        i = self.kinds.index(kind)
        low = self._cumulative[i - 1] if i else 0
        return (self._cumulative[i] - low) / self._cumulative[-1]


def check_rate(rate: float, duration: float | None, workers: int | None = None) -> None:
    if workers is not None and not 1 <= workers <= 64:
        raise UsageError(f"--workers must be between 1 and 64, got {workers}")
    if not rate > 0 or rate > MAX_RATE:
        raise UsageError(f"--rate must be above 0 and at most {MAX_RATE:g} transactions/s, got {rate:g}")
    if duration is not None and not duration > 0:
        raise UsageError(f"--duration must be a positive number of seconds, got {duration:g}")


@dataclass
class Schedule:
    """When a worker's next transaction is due: `rate` per second from `start`, offset by `phase`.

    Open loop: the plan does not wait for slow transactions. A worker that falls more than
    `max_backlog_s` behind drops the missed slots instead of bursting to catch up (a burst would
    measure the backlog, not the system).
    """

    start: float
    rate: float
    phase: float = 0.0
    max_backlog_s: float = 1.0
    _n: int = 0
    dropped: int = 0

    def due(self, now: float) -> float:
        t = self.start + self.phase + self._n / self.rate
        if now - t > self.max_backlog_s:
            skip = int((now - t) * self.rate)
            self._n += skip
            self.dropped += skip
            t = self.start + self.phase + self._n / self.rate
        self._n += 1
        return t
