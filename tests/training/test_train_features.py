"""Pipeline features (history summary, category codes) and the feature-limited oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import two_tower
from training.features import (
    HISTORY_BUCKETS,
    HISTORY_SMOOTHING,
    category_codes,
    click_column,
    history_summary,
    item_tower_inputs,
    user_feature_matrix,
)
from training.ranker import CategoryDecoder
from training.reference import feature_oracle
from training.two_tower import TwoTowerConfig
from training.world import SOURCE_POLICY, World, WorldConfig, generate_world

SMALL = WorldConfig(n_users=300, n_items=3000, n_categories=12, seed=3)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(SMALL)


def test_user_vectors_append_a_standardised_history_block(world: World) -> None:
    users = user_feature_matrix(world)
    assert users.dtype == np.float32 and users.flags.c_contiguous
    assert users.shape == (SMALL.n_users, SMALL.user_feature_dim + SMALL.n_categories)
    np.testing.assert_array_equal(users[:, : SMALL.user_feature_dim], world.user_features)
    history = users[:, SMALL.user_feature_dim :]
    assert np.isfinite(history).all()
    np.testing.assert_allclose(history.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(history.std(axis=0), 1.0, atol=1e-3)
    np.testing.assert_array_equal(user_feature_matrix(world, history=False), world.user_features)


def test_history_is_the_standardised_smoothed_log_share_of_clicks_and_policy_shows(
    world: World,
) -> None:
    train = world.train
    counts = np.zeros((SMALL.n_users, SMALL.n_categories))
    categories = world.item_categories[train.items]
    np.add.at(counts, (train.users[train.clicked], categories[train.clicked]), 1)
    policy = train.sources == SOURCE_POLICY
    np.add.at(counts, (train.users[policy], categories[policy]), 1)
    summary = history_summary(train, world.item_categories, SMALL.n_users, SMALL.n_categories)
    # Undo the per-column standardisation: per-column affine maps with positive slopes.
    a = HISTORY_SMOOTHING
    log_share = np.log((counts + a) / (counts.sum(axis=1, keepdims=True) + a * 12))
    slope = log_share.std(axis=0) / summary.std(axis=0)
    assert (slope > 0).all()
    restored = summary * slope + (log_share.mean(axis=0) - summary.mean(axis=0) * slope)
    np.testing.assert_allclose(restored, log_share, atol=1e-4)


def test_history_width_is_bounded() -> None:
    n_categories = HISTORY_BUCKETS + 36
    world = generate_world(WorldConfig(n_users=50, n_items=500, n_categories=n_categories))
    summary = history_summary(world.train, world.item_categories, 50, n_categories)
    assert summary.shape == (50, HISTORY_BUCKETS)


def test_category_codes_decode_every_item(world: World) -> None:
    codes = category_codes(world)
    assert codes.codes.shape == (SMALL.n_categories, 8)
    block = world.item_features[:, codes.start : codes.stop]
    np.testing.assert_array_equal(block, codes.codes[world.item_categories])
    decoder = CategoryDecoder(codes)
    with torch.no_grad():
        one_hot = decoder(torch.from_numpy(world.item_features)).numpy()
    np.testing.assert_array_equal(one_hot.argmax(axis=1), world.item_categories)
    assert one_hot.max(axis=1).min() > 0.999
    inputs = item_tower_inputs(world, codes)
    assert inputs.shape == (SMALL.n_items, SMALL.item_feature_dim + SMALL.n_categories)
    np.testing.assert_array_equal(
        inputs[:, SMALL.item_feature_dim :], codes.one_hot(world.item_categories)
    )
    np.testing.assert_array_equal(item_tower_inputs(world, None), world.item_features)


def test_feature_oracle_estimates_the_hidden_variables(world: World) -> None:
    users = user_feature_matrix(world)
    estimate = feature_oracle(world, users, world.item_features)
    truth = world.truth
    for name in ("user_latent", "user_conversion", "user_category_pref", "item_latent"):
        got, want = getattr(estimate, name), getattr(truth, name)
        assert got.shape == want.shape and got.dtype == np.float32, name
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.5, name
    assert estimate.item_static_logit.shape == truth.item_static_logit.shape
    # Everything observable is kept as is.
    np.testing.assert_array_equal(estimate.item_categories, truth.item_categories)
    pair = estimate.pair_scores(np.array([0, 1]), np.array([5, 6]))
    assert ((pair.click > 0) & (pair.click < 1)).all()


def test_click_column_is_the_standardised_train_click_count(world: World) -> None:
    column = click_column(world)
    items = np.arange(SMALL.n_items, dtype=np.int64)
    np.testing.assert_array_equal(column.counts, world.train_click_counts())
    none_removed = column.without(items, np.zeros(SMALL.n_items, dtype=np.int64))
    np.testing.assert_allclose(none_removed, world.item_features[:, column.column], atol=1e-5)
    all_removed = column.without(items, column.counts)
    np.testing.assert_allclose(all_removed, (0.0 - column.mean) / column.std, atol=1e-6)


def test_two_tower_trains_without_each_examples_own_click(world: World) -> None:
    """The leakage leave-one-out removes: an item's click count includes the clicks of the
    impressions trained on. Each impression's item input has its own click taken out, and
    each softmax positive one click; serving inputs (the item features) are left alone."""
    column = click_column(world)
    inputs = item_tower_inputs(world, category_codes(world))
    train = world.train
    config = TwoTowerConfig()
    data = two_tower._tensors(
        user_feature_matrix(world), inputs, train, world.item_categories, config, column
    )
    want = column.without(train.items, train.clicked.astype(np.int64))
    np.testing.assert_array_equal(data.imp_click_value.numpy(), want)
    clicked = np.flatnonzero(train.clicked)[:5]
    idx = torch.from_numpy(clicked)
    got = two_tower._item_inputs(data, data.imp_items[idx], data.imp_click_value[idx]).numpy()
    full = inputs[train.items[clicked]]
    assert (got[:, column.column] < full[:, column.column]).all()
    np.testing.assert_array_equal(
        np.delete(got, column.column, 1), np.delete(full, column.column, 1)
    )
    off = two_tower._tensors(
        user_feature_matrix(world),
        inputs,
        train,
        world.item_categories,
        TwoTowerConfig(leave_one_out_clicks=False),
        column,
    )
    assert off.click_column == -1
    np.testing.assert_array_equal(two_tower._item_inputs(off, data.imp_items[idx], None), full)
