"""Offline metric functions on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import auc, ndcg_at_k, recall_at_k, top_k


def test_top_k_orders_best_first_with_low_index_tie_break() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(top_k(scores, 3), [[1, 3, 2], [0, 1, 2]])


def test_recall_at_k_averages_per_user() -> None:
    ranked = np.array([[5, 6, 7], [1, 2, 3]])
    rows = np.array([0, 0, 1])
    items = np.array([6, 9, 4])
    assert recall_at_k(ranked, rows, items, 3) == pytest.approx((0.5 + 0.0) / 2)
    assert recall_at_k(ranked, rows, items, 1) == pytest.approx(0.0)


def test_ndcg_at_k() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]])
    gains = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    value, users = ndcg_at_k(scores, gains, 2)
    assert users == 2  # the last row has no gain and is skipped
    assert value == pytest.approx((1 / math.log2(3) + 0.0) / 2)


def test_auc_counts_ties_as_half() -> None:
    labels = np.array([True, False, True, False])
    assert auc(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert auc(np.array([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    assert auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([True, True])))
