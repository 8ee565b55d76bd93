"""Adaptive quality factor per stage (after X's product-mixer ``QualityFactor``).

Each stage keeps its recent timings. Every ``every`` timings it compares their p95 with
its target: above it, the factor drops by ``step``; below ``target * (1 - step)`` (a
little hysteresis, so a stage at its target does not oscillate), it rises by ``step``.
The factor stays within ``[minimum, maximum]`` and scales the candidate count the stage
consumes, so a stage that keeps running late gets fewer candidates before it has to
degrade, and gets them back once it is fast again.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class QualityFactor:
    """The quality factor of one stage.

    Args:
        target_s: p95 the stage should stay under.
        minimum: lowest factor; ``maximum`` the highest (1.0: the configured count).
        step: change per adjustment.
        window: timings the p95 is taken over.
        every: timings between adjustments.
    """

    def __init__(
        self,
        target_s: float,
        *,
        minimum: float = 0.2,
        maximum: float = 1.0,
        step: float = 0.05,
        window: int = 200,
        every: int = 20,
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError("quality factor bounds must satisfy 0 < minimum <= maximum")
        self.target_s = target_s
        self.minimum = minimum
        self.maximum = maximum
        self.step = step
        self.every = max(1, every)
        self.factor = maximum
        self._timings: deque[float] = deque(maxlen=max(1, window))
        self._since = 0

    def observe(self, seconds: float) -> None:
        """Record one timing of the stage; adjust the factor every ``every`` timings."""
        self._timings.append(seconds)
        self._since += 1
        if self._since < self.every:
            return
        self._since = 0
        p95 = self.p95()
        if p95 > self.target_s:
            self.factor = max(self.minimum, self.factor - self.step)
        elif p95 < self.target_s * (1 - self.step):
            self.factor = min(self.maximum, self.factor + self.step)

    def p95(self) -> float:
        """p95 of the recent timings (0 before any)."""
        if not self._timings:
            return 0.0
        return float(np.percentile(np.fromiter(self._timings, dtype=np.float64), 95))

    def scale(self, count: int, floor: int = 1) -> int:
        """``count`` scaled by the factor, at least ``min(floor, count)``."""
        return max(min(floor, count), round(count * self.factor))
