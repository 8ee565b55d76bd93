"""Issue 19's ranker pieces: leave-one-out click column, IPW weights, the multi-task
trace and PCGrad, the world's logging propensities, the manifest's audit trail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from training.features import category_codes, click_column, user_feature_matrix
from training.propensity import logging_propensities
from training.ranker import (
    RankerConfig,
    RankerTrace,
    _pcgrad,
    ipw_weights,
    ranking_examples,
    train_ranker,
)
from training.world import Interactions, WorldConfig, generate_world

SMALL = WorldConfig(n_users=60, n_items=400, n_categories=8, impressions_per_user=20)


def test_leave_one_out_column_drops_only_the_examples_own_click() -> None:
    world = generate_world(SMALL)
    clicks = click_column(world)
    examples = ranking_examples(world.train, 1.0, clicks=clicks)
    assert examples.item_column == world.item_features.shape[1] - 2
    assert examples.item_values is not None
    shipped = world.item_features[world.train.items, examples.item_column]
    unclicked = ~world.train.clicked
    np.testing.assert_allclose(examples.item_values[unclicked], shipped[unclicked], atol=1e-5)
    clicked = world.train.clicked
    assert np.all(examples.item_values[clicked] < shipped[clicked])
    rows = examples.item_rows(torch.from_numpy(world.item_features), torch.arange(5))
    np.testing.assert_allclose(rows[:, examples.item_column].numpy(), examples.item_values[:5])


def test_ipw_weights_are_clipped_and_self_normalised() -> None:
    p = np.array([0.5, 0.1, 0.01, 1e-6])
    w = ipw_weights(p, clip=3.0)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)
    assert np.all(np.diff(w) >= 0)  # rarer shown, more weight
    raw = 1.0 / p
    capped = np.minimum(raw / raw.mean(), 3.0)  # the rarest impression's weight is capped
    assert capped[-1] == 3.0
    np.testing.assert_allclose(w, capped / capped.mean(), rtol=1e-5)
    unclipped = ipw_weights(p[:3], clip=1e9)
    np.testing.assert_allclose(unclipped / unclipped[0], [1.0, 5.0, 50.0], rtol=1e-5)


def test_logging_propensities_are_a_distribution_over_items() -> None:
    world = generate_world(SMALL)
    n = SMALL.n_items
    users = np.full(n, 3, dtype=np.int64)
    every_item = Interactions(
        users=users,
        items=np.arange(n, dtype=np.int64),
        times=np.zeros(n),
        clicked=np.zeros(n, dtype=bool),
        converted=np.zeros(n, dtype=bool),
        sources=np.zeros(n, dtype=np.int8),
    )
    p = logging_propensities(world, every_item, draws=32)
    assert p.sum() == pytest.approx(1.0, abs=0.02)
    assert np.all(p >= 0.1 / n)  # the exploration share bounds it from below


def test_trace_records_gradient_cosines_and_pcgrad_removes_conflict() -> None:
    world = generate_world(SMALL)
    user_x = user_feature_matrix(world)
    examples = ranking_examples(world.train, 1.0, clicks=click_column(world))
    trace = RankerTrace(every=1)
    config = RankerConfig(epochs=1, batch_size=256, pcgrad=True)
    train_ranker(
        user_x, world.item_features, examples, config, seed=0,
        codes=category_codes(world), progress=False, trace=trace,
    )  # fmt: skip
    assert trace.cosines and len(trace.cosines) == len(trace.steps) == trace.pcgrad_steps
    assert all(-1.0 <= c <= 1.0 for c in trace.cosines)
    assert trace.projected == sum(c < 0 for c in trace.cosines)
    # the projection itself: two conflicting gradients leave a sum that conflicts with neither
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.zeros(2)
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    _pcgrad([param], [g1, g2], None)
    assert float(param.grad @ g1) >= -1e-6 and float(param.grad @ g2) >= -1e-6


def test_single_head_training_is_checked() -> None:
    world = generate_world(SMALL)
    examples = ranking_examples(world.train, 1.0)
    with pytest.raises(ValueError):
        train_ranker(
            user_feature_matrix(world), world.item_features, examples,
            RankerConfig(epochs=1, trained_heads=("dwell",)), seed=0, progress=False,
        )  # fmt: skip


def test_manifest_records_the_training_data_and_a_model_card(tiny_root: object) -> None:
    from pathlib import Path

    assert isinstance(tiny_root, Path)
    built: ArtifactSet = load_artifact_set(resolve_current(tiny_root), verify=True)
    data = built.config["training_data"]
    assert data["source"] == "world" and data["data_seed"] == built.manifest["seeds"]["data"]
    assert data["train_impressions"] > data["train_clicks"] > data["train_conversions"] > 0
    assert len(data["ranker_examples_sha256"]) == 64
    assert built.config["ranker"]["leave_one_out"] is True
    assert {"python", "scipy", "torch", "numpy"} <= set(built.manifest["libraries"])
    card = built.file("model_card").read_text()
    assert "## Intended use" in card and "## Known limits" in card
    auc = built.metrics["ranking.auc.click"]
    assert f"{auc:.4f}" in card


def test_mtl_report_compares_the_loss_configurations_and_the_weighting(
    tiny_root: object,
) -> None:
    from pathlib import Path

    from training.features import category_codes
    from training.mtl import mtl_report
    from training.pipeline import world_of

    assert isinstance(tiny_root, Path)
    built = load_artifact_set(resolve_current(tiny_root), verify=False)
    world, eval_cfg = world_of(built)
    user_x = np.load(built.file("user_features"))
    trace = RankerTrace(every=1, steps=[0, 1, 2], cosines=[0.5, -0.1, 0.3])
    report = mtl_report(
        world, user_x, category_codes(world), built.paths, eval_cfg,
        RankerConfig(epochs=1), trace, seed=0,
    )  # fmt: skip
    conflict = report["gradient_conflict"]
    assert conflict["steps"] == 3 and conflict["negative_share"] == pytest.approx(1 / 3)
    assert conflict["mean"] == pytest.approx(0.7 / 3, abs=1e-6)
    variants = report["variants"]
    assert {"sum", "uncertainty", "pcgrad", "click_alone", "conversion_alone"} <= set(variants)
    assert variants["sum"]["auc.click"] == pytest.approx(built.metrics["ranking.auc.click"])
    for head in ("click", "conversion"):
        alone = variants[f"{head}_alone"][f"auc.{head}"]
        assert report["negative_transfer"][head]["auc"] == pytest.approx(
            variants["sum"][f"auc.{head}"] - alone, abs=1e-5
        )
    assert report["chosen"]["loss"] in variants
    unbiased = report["unbiased"]
    rates = unbiased["train_click_rate"]
    # the weights remove the exposure bias of the log's click rate
    assert abs(rates["ipw"] - rates["true_uniform"]) < abs(rates["naive"] - rates["true_uniform"])
    for model in ("unweighted", "ipw"):
        low, high = unbiased[model]["bias_ci95"]
        assert low <= unbiased[model]["bias"] <= high
