"""Re-rank: the final order of the exploit slots, spread over categories.

Two diversity methods, both working on candidate *positions* given best first:

* :func:`mmr` — maximal marginal relevance. Each next slot takes the candidate with the
  highest ``λ · relevance - (1 - λ) · max similarity to the ones already taken``, where
  relevance is rank-based (``1 - rank / len(order)``, so heavy-scored and pre-rank-scored
  candidates, which live on different scales, compare) and similarity is 1 between two
  items of the same known category, else 0. ``λ = 1`` is score order; ``λ = 0`` takes a new
  category while one is left (best first among equals).
* :func:`diversify` — a hard cap of items per category, held-back items filling the
  remaining slots in score order.

:func:`mmr` checks a deadline between slots and fills what is left in score order when
it passes, so re-rank never fails for lack of time: it falls back to score order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Reranked:
    """The chosen positions, and how many slots diversity decided before time ran out."""

    chosen: I64
    diversified: int


def diversify(
    order: I64,
    categories: I32,
    n: int,
    max_per_category: int,
) -> I64:
    """Pick ``n`` positions of ``order`` (best first) with at most ``max_per_category`` each.

    Items held back by the cap fill the remaining slots in score order, so the result
    has ``min(n, len(order))`` entries whenever the candidates allow it.

    Args:
        order: candidate positions, best first.
        categories: category of each candidate position (``-1`` unknown: never capped).
        n: slots to fill.
        max_per_category: cap per category; ``0`` disables the cap.
    """
    if max_per_category <= 0:
        return order[:n]
    taken: list[int] = []
    held: list[int] = []
    counts: dict[int, int] = {}
    for position in order.tolist():
        if len(taken) == n:
            break
        category = int(categories[position])
        if category >= 0 and counts.get(category, 0) >= max_per_category:
            held.append(position)
            continue
        counts[category] = counts.get(category, 0) + 1
        taken.append(position)
    taken.extend(held[: n - len(taken)])
    return np.asarray(taken, dtype=np.int64)


def mmr(
    order: I64,
    categories: I32,
    n: int,
    lam: float,
    *,
    relevance: F64 | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Reranked:
    """Pick ``n`` positions of ``order`` (best first) by maximal marginal relevance.

    Args:
        order: candidate positions, best first.
        categories: category of each candidate position (``-1`` unknown: similar to none).
        n: slots to fill.
        lam: weight of relevance in ``[0, 1]``.
        relevance: relevance of each entry of ``order`` (default: rank-based, see above);
            ``order`` must then be sorted by it, best first.
        deadline: ``clock()`` value after which the remaining slots are filled in order.
    """
    n = min(n, order.size)
    if n == 0:
        return Reranked(np.zeros(0, dtype=np.int64), 0)
    if lam >= 1.0:
        return Reranked(order[:n].copy(), n)
    if relevance is None:
        relevance = 1.0 - np.arange(order.size, dtype=np.float64) / order.size
    cats = categories[order]
    known = cats >= 0
    penalty = np.zeros(order.size, dtype=np.float64)
    available = np.ones(order.size, dtype=bool)
    picked: list[int] = []
    for _ in range(n):
        if deadline is not None and clock() > deadline:
            break
        gain = lam * relevance - (1.0 - lam) * penalty
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        if known[best]:
            penalty[cats == cats[best]] = 1.0
    diversified = len(picked)
    if diversified < n:
        rest = np.flatnonzero(available)[: n - diversified]
        picked.extend(rest.tolist())
    return Reranked(order[np.asarray(picked, dtype=np.int64)], diversified)


def category_spread(categories: I32) -> int:
    """Distinct known categories among ``categories``."""
    return len({c for c in categories.tolist() if c >= 0})


def ctr_lift(clicks: F64, impressions: F64, prior_clicks: float, prior_impressions: float) -> F64:
    """How much better than the prior an item's recent click-through rate is, in log terms:
    ``ln(((clicks + a) / (impressions + b)) / (a / b))`` with ``a = prior_clicks`` and
    ``b = prior_impressions``.

    The counts are the item's decayed counters (recent events weigh more). The prior
    smooths: an item with no counts has a lift of 0, one with few moves a little, and only
    many impressions (clicked or not) move it far. Positive above the prior CTR ``a / b``,
    negative below it.
    """
    smoothed = (clicks + prior_clicks) / (impressions + prior_impressions)
    return np.log(smoothed * (prior_impressions / prior_clicks))
