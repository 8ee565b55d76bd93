"""Exploration slots: the policy's propensities are the probabilities it really shows items with."""

from __future__ import annotations

import numpy as np
import pytest

from core.explore import build_slate, explore_slots, inclusion_probabilities, rng_for

ORDER = np.arange(200, dtype=np.int64) + 1000  # cascade order, best first


@pytest.mark.parametrize(
    ("n", "share", "pool", "slots"),
    [
        (10, 0.1, 100, 1),
        (10, 0.25, 100, 3),
        (5, 0.1, 100, 1),
        (4, 0.1, 100, 0),
        (10, 0.0, 100, 0),
        (10, 1.0, 100, 10),
        (10, 0.5, 3, 3),
        (10, 0.5, 0, 0),
    ],
)
def test_explore_slot_count(n: int, share: float, pool: int, slots: int) -> None:
    assert explore_slots(n, share, pool) == slots


def test_a_slate_keeps_the_exploit_head_and_draws_the_rest_from_the_pool() -> None:
    slate = build_slate(ORDER, 10, 0.3, 50, np.random.default_rng(7))
    assert slate.explored.sum() == 3
    assert not slate.explored[0]  # the top slot stays exploit
    exploit = slate.positions[~slate.explored]
    assert exploit.tolist() == ORDER[:7].tolist()  # in order
    explored = slate.positions[slate.explored]
    assert set(explored.tolist()) <= set(ORDER[7:57].tolist())
    assert len(set(slate.positions.tolist())) == 10
    assert slate.propensities[~slate.explored].tolist() == [1.0] * 7
    assert slate.propensities[slate.explored] == pytest.approx([3 / 50] * 3)


def test_propensities_match_the_empirical_inclusion_frequencies() -> None:
    n, share, pool = 10, 0.2, 20
    expected = inclusion_probabilities(ORDER.size, n, share, pool)
    # Over every candidate, the probabilities of being shown sum to the slots.
    assert expected.sum() == pytest.approx(n)
    assert expected[:8].tolist() == [1.0] * 8
    assert expected[8:28] == pytest.approx([2 / 20] * 20)
    assert expected[28:].sum() == 0
    shown = np.zeros(ORDER.size)
    rng = np.random.default_rng(0)
    draws = 10000
    for _ in range(draws):
        slate = build_slate(ORDER, n, share, pool, rng)
        shown[slate.positions - 1000] += 1
        # Each slate reports exactly the policy's probability for the items it shows.
        assert np.allclose(slate.propensities, expected[slate.positions - 1000])
    frequency = shown / draws
    assert frequency == pytest.approx(expected, abs=0.015)
    # Inverse-propensity weights of the shown items add up to the candidates' count on
    # average: each candidate contributes P(shown) / P(shown) = 1 when it can be shown.
    assert (shown / draws / np.where(expected > 0, expected, 1)).sum() == pytest.approx(
        28, rel=0.02
    )


def test_no_exploration_when_every_candidate_is_shown_anyway() -> None:
    slate = build_slate(ORDER[:8], 10, 0.5, 50, np.random.default_rng(1))
    assert slate.positions.tolist() == ORDER[:8].tolist()
    assert slate.propensities.tolist() == [1.0] * 8
    assert not slate.explored.any()


def test_the_same_request_draws_the_same_slate() -> None:
    first = build_slate(ORDER, 10, 0.3, 50, rng_for("req-1", "demo"))
    again = build_slate(ORDER, 10, 0.3, 50, rng_for("req-1", "demo"))
    other = [build_slate(ORDER, 10, 0.3, 50, rng_for(f"req-{i}", "demo")) for i in range(2, 12)]
    assert first.positions.tolist() == again.positions.tolist()
    assert any(o.positions.tolist() != first.positions.tolist() for o in other)
