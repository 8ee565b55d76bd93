"""Re-rank: MMR against category caps and score order, and its fallback when time runs out."""

from __future__ import annotations

import numpy as np

from services.ranking.rerank import category_spread, diversify, mmr

# 30 candidates, best first: ten of category 0, ten of 1, five of 2, five of 3.
ORDER = np.arange(30, dtype=np.int64)
CATEGORIES = np.asarray([0] * 10 + [1] * 10 + [2] * 5 + [3] * 5, dtype=np.int32)


def spread(chosen: np.ndarray) -> int:
    return category_spread(CATEGORIES[chosen])


def test_mmr_lambda_one_is_score_order() -> None:
    picked = mmr(ORDER, CATEGORIES, 5, 1.0)
    assert picked.chosen.tolist() == [0, 1, 2, 3, 4]
    assert spread(picked.chosen) == 1


def test_mmr_lambda_zero_takes_a_new_category_while_one_is_left() -> None:
    picked = mmr(ORDER, CATEGORIES, 6, 0.0)
    # The best of each category in turn, then (every category taken) the best left.
    assert picked.chosen.tolist() == [0, 10, 20, 25, 1, 2]
    assert spread(picked.chosen[:4]) == 4
    assert picked.diversified == 6


def test_category_spread_grows_as_lambda_falls() -> None:
    spreads = [spread(mmr(ORDER, CATEGORIES, 8, lam).chosen) for lam in (1.0, 0.9, 0.5, 0.0)]
    assert spreads == sorted(spreads)
    assert spreads[0] == 1 and spreads[-1] == 4


def test_mmr_ignores_unknown_categories() -> None:
    categories = np.asarray([-1, -1, -1, 5, 5], dtype=np.int32)
    picked = mmr(np.arange(5, dtype=np.int64), categories, 4, 0.0)
    assert picked.chosen.tolist() == [0, 1, 2, 3]


def test_mmr_uses_given_relevance() -> None:
    order = np.asarray([4, 2, 0], dtype=np.int64)
    categories = np.asarray([1, 9, 1, 9, 2], dtype=np.int32)
    picked = mmr(order, categories, 2, 0.5, relevance=np.asarray([3.0, 2.9, 0.1]))
    assert picked.chosen.tolist() == [4, 2]


def test_mmr_falls_back_to_score_order_when_its_deadline_passes() -> None:
    ticks = iter(np.arange(0.0, 1.0, 0.001))

    def clock() -> float:
        return float(next(ticks))

    picked = mmr(ORDER, CATEGORIES, 6, 0.0, deadline=0.0015, clock=clock)
    # Two slots diversified before the deadline, the other four in score order.
    assert picked.diversified == 2
    assert picked.chosen.tolist() == [0, 10, 1, 2, 3, 4]
    expired = mmr(ORDER, CATEGORIES, 3, 0.0, deadline=-1.0, clock=lambda: 0.0)
    assert expired.diversified == 0
    assert expired.chosen.tolist() == [0, 1, 2]


def test_category_cap_holds_back_then_fills() -> None:
    chosen = diversify(ORDER, CATEGORIES, 6, 2)
    assert chosen.tolist() == [0, 1, 10, 11, 20, 21]
    only_zero = np.zeros(5, dtype=np.int32)
    assert diversify(np.arange(5, dtype=np.int64), only_zero, 4, 1).tolist() == [0, 1, 2, 3]


def test_fewer_candidates_than_slots() -> None:
    assert mmr(ORDER[:3], CATEGORIES, 10, 0.3).chosen.tolist() == [0, 1, 2]
    assert mmr(ORDER[:0], CATEGORIES, 10, 0.3).chosen.size == 0
