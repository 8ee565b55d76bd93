"""The synthetic world: determinism, shapes, and the contracts of its logs and oracle."""

from __future__ import annotations

import numpy as np
import pytest

from training.world import (
    EXPLORATION_SHARE,
    SOURCE_EXPLORE,
    SOURCE_POLICY,
    SOURCE_POPULAR,
    World,
    WorldConfig,
    generate_world,
)

SMALL = WorldConfig(n_users=300, n_items=3000, n_categories=10, seed=7)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(SMALL)


def test_same_seed_gives_identical_world(world: World) -> None:
    again = generate_world(SMALL)
    np.testing.assert_array_equal(world.user_features, again.user_features)
    np.testing.assert_array_equal(world.item_features, again.item_features)
    np.testing.assert_array_equal(world.item_categories, again.item_categories)
    for part in ("train", "heldout"):
        ours, theirs = getattr(world, part), getattr(again, part)
        for field in ("users", "items", "times", "clicked", "converted", "sources"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))


def test_other_seed_gives_other_world(world: World) -> None:
    other = generate_world(WorldConfig(n_users=300, n_items=3000, n_categories=10, seed=8))
    assert not np.array_equal(world.item_features, other.item_features)
    assert not np.array_equal(world.train.items, other.train.items)


def test_observable_shapes_and_dtypes(world: World) -> None:
    c = SMALL
    assert world.user_features.shape == (c.n_users, c.user_feature_dim)
    assert world.item_features.shape == (c.n_items, c.item_feature_dim)
    assert world.user_features.dtype == world.item_features.dtype == np.float32
    assert np.isfinite(world.user_features).all() and np.isfinite(world.item_features).all()
    assert world.item_categories.dtype == np.int32
    assert set(np.unique(world.item_categories)) == set(range(c.n_categories))


def test_heldout_is_each_users_latest_impressions(world: World) -> None:
    train, held = world.train, world.heldout
    assert set(np.unique(held.users)) == set(range(SMALL.n_users))
    last_train = np.full(SMALL.n_users, -1.0)
    np.maximum.at(last_train, train.users, train.times)
    first_held = np.full(SMALL.n_users, 2.0)
    np.minimum.at(first_held, held.users, held.times)
    assert (last_train <= first_held).all()
    share = len(held) / (len(held) + len(train))
    assert share == pytest.approx(SMALL.heldout_fraction, abs=0.03)


def test_logs_are_sorted_and_conversion_implies_click(world: World) -> None:
    for logs in (world.train, world.heldout):
        key = logs.users + logs.times  # times are in [0, 1)
        assert (np.diff(key) >= 0).all()
        assert not (logs.converted & ~logs.clicked).any()
    ctr = world.train.clicked.mean()
    assert 0.05 < ctr < 0.8


def test_logs_carry_an_unbiased_exploration_slice(world: World) -> None:
    """About EXPLORATION_SHARE of impressions show uniformly random items; the others are
    exposure-biased (popular items are shown far more often than under uniform exposure)."""
    sources = np.concatenate([world.train.sources, world.heldout.sources])
    assert set(np.unique(sources)) == {SOURCE_POLICY, SOURCE_POPULAR, SOURCE_EXPLORE}
    explored = sources == SOURCE_EXPLORE
    assert explored.mean() == pytest.approx(EXPLORATION_SHARE, abs=0.01)
    np.testing.assert_array_equal(world.train.explored, world.train.sources == SOURCE_EXPLORE)
    items = np.concatenate([world.train.items, world.heldout.items])
    exposure = world.truth.item_exposure
    uniform_mean = exposure.mean()
    # Under uniform exposure the mean exposure weight of shown items is the catalogue mean.
    assert exposure[items[explored]].mean() == pytest.approx(uniform_mean, rel=0.15)
    assert exposure[items[~explored]].mean() > 3 * uniform_mean
    assert world.heldout.explored.any()


def test_oracle_scores_are_probabilities_consistent_with_pairs(world: World) -> None:
    users = np.array([0, 5, 17])
    items = np.array([1, 2, 999, 2999])
    matrix = world.oracle_scores(users, items)
    assert matrix.click.shape == (3, 4) and matrix.click.dtype == np.float32
    assert ((matrix.click > 0) & (matrix.click < 1)).all()
    assert (matrix.conversion <= matrix.click).all()
    pairs = world.truth.pair_scores(np.repeat(users, 4), np.tile(items, 3))
    np.testing.assert_allclose(pairs.click.reshape(3, 4), matrix.click, rtol=1e-5)
    np.testing.assert_allclose(pairs.conversion.reshape(3, 4), matrix.conversion, rtol=1e-5)
    assert world.oracle_scores(users).click.shape == (3, SMALL.n_items)


def test_clicks_follow_the_oracle(world: World) -> None:
    """Logged click rates track the ground-truth probabilities they were drawn from."""
    p = world.truth.pair_scores(world.train.users, world.train.items).click
    high = p > np.median(p)
    assert world.train.clicked[high].mean() > world.train.clicked[~high].mean() + 0.1
    assert world.train.clicked.mean() == pytest.approx(p.mean(), abs=0.02)


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        WorldConfig(n_items=5, n_categories=10)
    with pytest.raises(ValueError):
        WorldConfig(heldout_fraction=1.5)
