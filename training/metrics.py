"""Offline ranking metrics over numpy arrays: top-k, recall@k, NDCG@k and AUC."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def top_k(scores: NDArray[np.floating], k: int) -> NDArray[np.int64]:
    """Column indices of the ``k`` highest scores of each row, best first ``[rows, k]``.

    Ties are broken by the lower column index, so the result is deterministic."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part.sort(axis=1)  # fixed order before the stable sort makes ties deterministic
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def recall_at_k(
    ranked: NDArray[np.int64],
    rows: NDArray[np.int64],
    items: NDArray[np.int64],
    k: int,
) -> float:
    """Mean over rows of the share of that row's relevant items found in ``ranked[row, :k]``.

    ``(rows[j], items[j])`` are the distinct relevant pairs; rows without any are ignored.
    ``ranked`` is ``[n_rows, >=k]`` item ids.
    """
    if rows.shape[0] == 0:
        return 0.0
    n_rows = ranked.shape[0]
    width = int(max(ranked.max(initial=0), items.max(initial=0))) + 1
    ranked_keys = (np.arange(n_rows)[:, None] * width + ranked[:, :k]).ravel()
    hits = np.isin(rows * width + items, ranked_keys)
    per_row_hits = np.bincount(rows, weights=hits, minlength=n_rows)
    per_row_total = np.bincount(rows, minlength=n_rows)
    has = per_row_total > 0
    return float(np.mean(per_row_hits[has] / per_row_total[has]))


def ndcg_at_k(
    scores: NDArray[np.floating], gains: NDArray[np.floating], k: int
) -> tuple[float, int]:
    """Mean NDCG@k of ranking each row's columns by ``scores``, with graded ``gains``
    (same shape), and the number of rows it averages over (rows with any gain)."""
    ranked = top_k(scores, k)
    discounts = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    dcg = (np.take_along_axis(gains, ranked, axis=1) * discounts).sum(axis=1)
    ideal = -np.sort(-gains, axis=1)[:, : ranked.shape[1]]
    idcg = (ideal * discounts).sum(axis=1)
    has = idcg > 0
    if not has.any():
        return 0.0, 0
    return float(np.mean(dcg[has] / idcg[has])), int(has.sum())


def auc(scores: NDArray[np.floating], labels: NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half); NaN if one class is
    absent."""
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(scores.shape[0], dtype=np.float64)
    # Average rank (1-based) over each run of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.shape[0]]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
