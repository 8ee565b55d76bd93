"""Re-rank: the final order under a per-category cap, so one category cannot fill the page."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def diversify(
    order: npt.NDArray[np.int64],
    categories: npt.NDArray[np.int32],
    n: int,
    max_per_category: int,
) -> npt.NDArray[np.int64]:
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
