"""Feature engineering done by the pipeline on top of the world's observables (torch-free).

* **User history summary.** The shipped user vector (``user_features.npy``, the input of
  ``user_tower.onnx`` and of ``ranker.onnx``) is the world's profile vector followed by a
  summary of the user's train history: per category bucket, the smoothed log share of
  their *events*, ``log((events_b + a) / (events + a * n_buckets))``, column-standardised,
  where an event is a click or an impression filled by the logging policy (the previous
  recommender, :data:`training.world.SOURCE_POLICY`). The policy picks a category by the
  user's preference before it picks an item, so its impressions reveal that preference
  with about twice as many observations as the clicks alone; impressions of the popularity
  and exploration slots carry no information about the user and are left out.
  Buckets are categories (``category % HISTORY_BUCKETS`` beyond :data:`HISTORY_BUCKETS`
  categories, so the width stays bounded). It is computed once, at the training cut, like
  the world's other log-derived features (activity, item click counts); serving reads it
  from the feature store like any other user feature.
* **Category codes.** Item features carry each item's category as an 8-dimensional
  embedding, identical for all items of a category. Models that want the category as a
  one-hot block (the item tower, the ranker) get :class:`CategoryCodes`: the distinct code
  per category and the columns that hold it. The ranker decodes the one-hot from those
  columns inside its ONNX graph (nearest code), so the served inputs stay ``item_features``.
* **Click column.** :class:`ClickColumn` locates the standardised log(1 + train clicks)
  column of item features and recomputes it for a count with clicks left out, so the
  two-tower can train on each impression without its own click (that count includes the
  labels trained on; see :mod:`training.two_tower`).

Measured on the default world (``docs/models.md``, ablations): the history block is worth
about 0.008 of two-tower recall@100 and the category one-hot about as much; counting
policy impressions besides clicks in the history raised recall@100 from 0.0297 to 0.0308
(with the embedding dimension 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from training.world import CATEGORY_EMBED_DIM, SOURCE_POLICY, Interactions, World

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]

HISTORY_BUCKETS = 64
"""Upper bound on the width of the history block."""
HISTORY_SMOOTHING = 1.0
"""Pseudo-count ``a`` per bucket in the smoothed log event share."""


def history_buckets(n_categories: int) -> int:
    """Width of the history block for a world with ``n_categories`` categories."""
    return min(n_categories, HISTORY_BUCKETS)


def history_summary(
    logs: Interactions, item_categories: NDArray[np.int32], n_users: int, n_categories: int
) -> F32:
    """The history block ``[n_users, history_buckets(n_categories)]`` from the clicks and
    policy impressions in ``logs`` (column-standardised; users without either get the
    smoothed uniform share). A clicked policy impression counts twice."""
    buckets = history_buckets(n_categories)
    weights = logs.clicked.astype(np.float64) + (logs.sources == SOURCE_POLICY)
    bucket = item_categories[logs.items].astype(np.int64) % buckets
    counts = np.bincount(
        logs.users * buckets + bucket, weights=weights, minlength=n_users * buckets
    )
    counts = counts.reshape(n_users, buckets).astype(np.float64)
    share = (counts + HISTORY_SMOOTHING) / (
        counts.sum(axis=1, keepdims=True) + HISTORY_SMOOTHING * buckets
    )
    log_share = np.log(share)
    std = log_share.std(axis=0)
    standard = (log_share - log_share.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return np.asarray(standard, dtype=np.float32)


def user_feature_matrix(world: World, *, history: bool = True) -> F32:
    """The shipped user vectors: profile features followed by the history block (without
    it when ``history`` is false, for ablations)."""
    if not history:
        return np.ascontiguousarray(world.user_features)
    summary = history_summary(
        world.train, world.item_categories, world.config.n_users, world.config.n_categories
    )
    return np.ascontiguousarray(np.concatenate([world.user_features, summary], axis=1))


@dataclass(frozen=True)
class CategoryCodes:
    """Where item features hold the category, and each category's code there.

    Attributes:
        start: first column of the category block in item features.
        codes: float32 ``[n_categories, CATEGORY_EMBED_DIM]``; row c is category c's block.
    """

    start: int
    codes: F32

    @property
    def stop(self) -> int:
        return self.start + int(self.codes.shape[1])

    def one_hot(self, item_categories: NDArray[np.int32]) -> F32:
        """float32 ``[N, n_categories]`` one-hot rows of ``item_categories``."""
        out = np.zeros((item_categories.shape[0], self.codes.shape[0]), dtype=np.float32)
        out[np.arange(item_categories.shape[0]), item_categories] = 1.0
        return out


def category_codes(world: World) -> CategoryCodes:
    """The category block of ``world.item_features`` (see :mod:`training.world`'s layout)."""
    return codes_of(world.item_features, world.item_categories)


def codes_of(item_features: F32, item_categories: NDArray[np.int32]) -> CategoryCodes:
    """The category block of item features laid out as :mod:`training.world` lays them out
    (the block, then two more columns, ends the row), read from an artifact set's
    ``item_features`` and ``item_categories`` as well as from a world. Every category
    ``0..max`` must have an item."""
    start = int(item_features.shape[1]) - CATEGORY_EMBED_DIM - 2
    block = item_features[:, start : start + CATEGORY_EMBED_DIM]
    _, first = np.unique(item_categories, return_index=True)
    return CategoryCodes(start=start, codes=np.ascontiguousarray(block[first], dtype=np.float32))


def item_tower_inputs(world: World, codes: CategoryCodes | None) -> F32:
    """Inputs of the item tower: item features followed by the category one-hot (none when
    ``codes`` is None). Only item embeddings ship, so the item tower may use inputs the
    served models do not see."""
    if codes is None:
        return np.ascontiguousarray(world.item_features)
    return np.ascontiguousarray(
        np.concatenate([world.item_features, codes.one_hot(world.item_categories)], axis=1)
    )


@dataclass(frozen=True)
class ClickColumn:
    """The item feature column that holds an item's train clicks, standardised
    ``(log(1 + clicks) - mean) / std`` (:mod:`training.world`'s layout: second to last).

    The count includes the clicks of the very impressions a model trains on, so on its
    own it leaks their labels; :meth:`without` gives the column's value for a count with
    some clicks left out (the two-tower's leave-one-out training inputs).

    Attributes:
        column: index of the column in item features.
        counts: int64 ``[N]`` train clicks per item.
        mean, std: the column's standardisation.
    """

    column: int
    counts: I64
    mean: float
    std: float

    def without(self, items: I64, removed: NDArray[np.integer]) -> F32:
        """float32 column values of ``items`` with ``removed`` of their clicks left out."""
        counts = np.maximum(self.counts[items] - removed, 0).astype(np.float64)
        return np.asarray((np.log1p(counts) - self.mean) / self.std, dtype=np.float32)


def click_column(world: World) -> ClickColumn:
    """The train-click column of ``world.item_features`` and its standardisation."""
    counts = world.train_click_counts()
    log_counts = np.log1p(counts.astype(np.float64))
    std = float(log_counts.std())
    return ClickColumn(
        column=int(world.item_features.shape[1]) - 2,
        counts=counts,
        mean=float(log_counts.mean()),
        std=std if std > 0 else 1.0,
    )
