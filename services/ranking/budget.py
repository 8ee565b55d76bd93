"""Stage budgets from the request's remaining deadline, and scoring that fits a budget.

The cascade runs ``item_features → prerank → heavy → rerank``. Each stage's budget is the
smaller of its configured budget and what the request has left, after keeping back the
reply margin and a reserve for every *later* stage that cannot be skipped (all but the
heavy ranker): a late, skippable stage pays for a tight deadline first, and re-rank always
has time to put N items in order.

:func:`score_within` scores candidates in order (best pre-rank score first) in chunks, and
stops before the chunk that would overrun the budget, planning with a moving average of
the measured cost per candidate (:class:`CostModel`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mesh.context import Budget

F32 = npt.NDArray[np.float32]

STAGES: tuple[str, ...] = ("item_features", "prerank", "heavy", "rerank")
"""The budgeted stages of the cascade, in order."""

SKIPPABLE = frozenset({"heavy"})
"""Stages the cascade can do without: they get no reserve from earlier stages."""


class StagePlanner:
    """Hands out stage budgets for one request.

    Args:
        budgets: configured budget of each stage in :data:`STAGES`, seconds.
        request: the request's budget (``None``: no deadline, configured budgets apply).
        reply_margin_s: kept back from the deadline to encode and send the answer.
        reserve_s: kept back for each later stage not in :data:`SKIPPABLE`.
    """

    def __init__(
        self,
        budgets: Mapping[str, float],
        request: Budget | None,
        reply_margin_s: float,
        reserve_s: float,
    ) -> None:
        self._budgets = budgets
        self._request = request
        self._margin = reply_margin_s
        self._reserve = reserve_s

    def configured(self, stage: str) -> float:
        """The stage's budget before the deadline is taken into account."""
        return self._budgets[stage]

    def answer_within(self) -> float | None:
        """Seconds until the answer must leave (deadline minus reply margin); None: no deadline."""
        if self._request is None:
            return None
        return max(0.0, self._request.remaining() - self._margin)

    def budget(self, stage: str) -> float:
        """Seconds ``stage`` may take if it starts now (0 when nothing is left)."""
        configured = self._budgets[stage]
        if self._request is None:
            return configured
        later = STAGES[STAGES.index(stage) + 1 :]
        reserved = self._reserve * sum(1 for s in later if s not in SKIPPABLE)
        left = self._request.remaining() - self._margin - reserved
        return max(0.0, min(configured, left))


class CostModel:
    """Moving average of the seconds one candidate costs a stage.

    It rises fast and falls slowly (``rise`` and ``fall`` are the weights of a new
    observation), so a slowdown is believed at once and a lucky fast call is not.
    """

    def __init__(self, rise: float = 0.5, fall: float = 0.1) -> None:
        self._rise = rise
        self._fall = fall
        self.per_candidate: float | None = None

    def observe(self, candidates: int, seconds: float) -> None:
        """Record a call that scored ``candidates`` in ``seconds``."""
        if candidates <= 0:
            return
        sample = seconds / candidates
        if self.per_candidate is None:
            self.per_candidate = sample
            return
        weight = self._rise if sample > self.per_candidate else self._fall
        self.per_candidate += weight * (sample - self.per_candidate)

    def affordable(self, budget_s: float, safety: float) -> int | None:
        """Candidates that fit in ``safety * budget_s``; ``None`` while the cost is unknown."""
        if self.per_candidate is None:
            return None
        if budget_s <= 0:
            return 0
        return math.floor(budget_s * safety / max(self.per_candidate, 1e-9))


@dataclass(frozen=True)
class Scored:
    """What :func:`score_within` managed: scores of the first ``len(scores)`` rows."""

    scores: F32
    calls: int
    per_candidate_s: float | None


def score_within(
    score: Callable[[int, int], F32],
    rows: int,
    budget_s: float,
    cost: CostModel,
    *,
    chunk: int,
    probe: int,
    safety: float,
    clock: Callable[[], float] = time.perf_counter,
) -> Scored:
    """Score rows ``0..rows`` in order with ``score(start, stop)``, as many as fit.

    The first call takes at most ``probe`` rows, so a model that became slower than its
    moving average says costs at most a probe's worth of overrun; every later call is
    sized by what is left of ``safety * budget_s`` divided by the larger of the moving
    average and the cost just measured. Scoring stops when the next call would not fit.

    Returns:
        the scores of a prefix of the rows (possibly empty: nothing fitted).
    """
    planned_end = clock() + budget_s * safety
    parts: list[F32] = []
    done = 0
    calls = 0
    seen: float | None = None
    while done < rows:
        left = planned_end - clock()
        if left <= 0:
            break
        take = min(chunk, rows - done) if calls else min(probe, chunk, rows)
        known = [c for c in (cost.per_candidate, seen) if c is not None]
        if known:
            take = min(take, math.floor(left / max(max(known), 1e-9)))
        if take <= 0:
            break
        started = clock()
        parts.append(np.asarray(score(done, done + take), dtype=np.float32))
        elapsed = clock() - started
        cost.observe(take, elapsed)
        seen = elapsed / take
        done += take
        calls += 1
    scores = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return Scored(scores, calls, cost.per_candidate)
