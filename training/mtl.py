"""Multi-task and unbiased-learning diagnostics of the heavy ranker (``train --mtl-report``).

:func:`mtl_report` runs after the pipeline has built and evaluated a set and returns a
JSON-able dict that lands in the manifest's ``config.mtl_report`` (and is printed):

* ``gradient_conflict``: the cosine between the click and the conversion losses'
  gradients on the shared parameters (:func:`training.ranker.shared_parameters`), traced
  every few steps while the shipped ranker trained: mean, quantiles, the share of
  conflicting (negative) steps, per third of training, and a one-sample t-test of the mean
  against 0 (``scipy.stats.ttest_1samp``). PCGrad is trained (and compared) only when
  conflict is frequent (at least :data:`FREQUENT_CONFLICT` of the steps); otherwise it
  equals the plain sum up to the rare projected steps.
* ``variants``: the shipped ranker (plain sum of the heads' losses) against uncertainty
  weighting (Kendall et al.), PCGrad when measured, and each head trained alone, all with
  the same data, seed and epochs: held-out and exploration-slice AUC per head and NDCG@10
  of the heavy score on the evaluation's candidates (the same users and candidates as
  ``ranking.ndcg@10.*``).
* ``negative_transfer``: per head, the joint model's AUC minus the head-alone model's
  (negative: the other task hurts this one).
* ``chosen``: the loss configuration kept and why (:func:`choose`).
* ``unbiased``: the ranker trained on the same impressions weighted by inverse logging
  propensity towards uniform exposure (:mod:`training.propensity`,
  :func:`training.ranker.ipw_weights`, clipped at :data:`training.ranker.IPW_CLIP` times
  the mean weight, self-normalised) against the unweighted one, on the held-out
  exploration slice (uniformly random items, where the world's true click probability is
  known): AUC, mean predicted minus true click probability with its 95 % interval
  (``scipy.stats.t``), and the
  cross-entropy against the true probabilities; plus the click rate of the training log
  naive, inverse-propensity weighted, and on its exploration slice (the bias the weights
  remove from the data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from scipy import stats

from training.evaluate import EvalConfig, _drop_seen, _eval_users, _load, _seen
from training.features import CategoryCodes, click_column
from training.metrics import auc, ndcg_at_k
from training.propensity import logging_propensities
from training.ranker import (
    HEADS,
    IPW_CLIP,
    MultiTaskRanker,
    RankerConfig,
    RankerTrace,
    ipw_weights,
    ranking_examples,
    train_ranker,
)
from training.world import World

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]

FREQUENT_CONFLICT = 0.2
"""Share of traced steps with a negative gradient cosine from which PCGrad is measured."""
TOLERANCE = 0.002
"""NDCG@10 by which a loss configuration must beat the plain sum to be chosen."""
_BATCH = 65536


@dataclasses.dataclass(frozen=True)
class _Eval:
    """What every variant is scored on."""

    cand_users: I64
    cand_items: I64
    valid: NDArray[np.bool_]
    gains: NDArray[np.float64]
    shape: tuple[int, int]


def mtl_report(
    world: World,
    user_x: F32,
    codes: CategoryCodes | None,
    files: Mapping[str, Path],
    eval_cfg: EvalConfig,
    ranker_cfg: RankerConfig,
    trace: RankerTrace,
    *,
    seed: int,
    progress: bool = False,
) -> dict[str, Any]:
    """The report of the module docstring for the set whose files are ``files`` (its
    ranker trained with ``ranker_cfg`` and traced into ``trace``)."""
    setup = _candidates(world, user_x, files, eval_cfg)
    item_x = world.item_features
    clicks = click_column(world) if ranker_cfg.leave_one_out else None
    examples = ranking_examples(world.train, ranker_cfg.exploration_weight, clicks=clicks)
    conflict = gradient_conflict(trace)

    def fit(cfg: RankerConfig, weights: F32 | None = None) -> MultiTaskRanker:
        data = examples
        if weights is not None:
            data = ranking_examples(
                world.train, cfg.exploration_weight, clicks=clicks, weights=weights
            )
        return train_ranker(user_x, item_x, data, cfg, seed=seed, codes=codes, progress=progress)

    shipped = _onnx_scorer(files["ranker"])
    variants: dict[str, dict[str, float]] = {"sum": _score(world, user_x, setup, shipped)}
    candidates = {"uncertainty": dataclasses.replace(ranker_cfg, loss_balance="uncertainty")}
    if conflict["negative_share"] >= FREQUENT_CONFLICT:
        candidates["pcgrad"] = dataclasses.replace(ranker_cfg, pcgrad=True)
    for head in HEADS:
        candidates[f"{head}_alone"] = dataclasses.replace(ranker_cfg, trained_heads=(head,))
    for name, cfg in candidates.items():
        variants[name] = _score(world, user_x, setup, _torch_scorer(fit(cfg)))
    transfer = {
        head: {
            kind: round(
                variants["sum"][f"{kind}.{head}"] - variants[f"{head}_alone"][f"{kind}.{head}"], 6
            )
            for kind in ("auc", "explore_auc")
        }
        for head in HEADS
    }
    propensities = logging_propensities(world, world.train, seed=seed)
    weights = ipw_weights(propensities, IPW_CLIP)
    raw = 1.0 / propensities
    weighted = _torch_scorer(fit(ranker_cfg, weights))
    unbiased = {
        "clip": IPW_CLIP,
        "effective_sample_share": round(
            float(weights.sum() ** 2 / (weights.astype(np.float64) ** 2).sum() / weights.size), 6
        ),
        "clipped_share": round(float(np.mean(raw / raw.mean() > IPW_CLIP)), 6),
        "train_click_rate": _click_rates(world, weights),
        "unweighted": _exploration(world, user_x, shipped),
        "ipw": _exploration(world, user_x, weighted),
        "unweighted_ndcg@10": variants["sum"]["ndcg@10"],
        "ipw_ndcg@10": _score(world, user_x, setup, weighted)["ndcg@10"],
    }
    return {
        "gradient_conflict": conflict,
        "variants": variants,
        "negative_transfer": transfer,
        "uncertainty_log_vars": trace.log_vars,
        "chosen": choose(variants, conflict),
        "unbiased": unbiased,
    }


def gradient_conflict(trace: RankerTrace) -> dict[str, Any]:
    """Summary of the traced gradient cosines (see the module docstring)."""
    cos = np.asarray(trace.cosines, dtype=np.float64)
    if cos.size == 0:
        return {"steps": 0, "negative_share": 0.0}
    thirds = np.array_split(cos, 3)
    test = stats.ttest_1samp(cos, 0.0) if cos.size > 1 else None
    return {
        "steps": int(cos.size),
        "every": trace.every,
        "mean": round(float(cos.mean()), 6),
        "quantiles": {
            str(q): round(float(np.quantile(cos, q)), 6) for q in (0.05, 0.25, 0.5, 0.75, 0.95)
        },
        "negative_share": round(float(np.mean(cos < 0.0)), 6),
        "mean_by_third": [round(float(t.mean()), 6) if t.size else 0.0 for t in thirds],
        "t_statistic": round(float(test.statistic), 4) if test is not None else 0.0,
        "p_value": float(test.pvalue) if test is not None else 1.0,
    }


def choose(
    variants: Mapping[str, Mapping[str, float]], conflict: Mapping[str, Any]
) -> dict[str, str]:
    """The loss configuration to ship: the plain sum unless uncertainty weighting or
    PCGrad beats its NDCG@10 by more than :data:`TOLERANCE` without losing held-out AUC."""
    base = variants["sum"]
    best, reason = "sum", "no balancing or projection beats the plain sum by more than "
    reason += f"{TOLERANCE} NDCG@10"
    for name in ("uncertainty", "pcgrad"):
        v = variants.get(name)
        if v is None:
            continue
        better = v["ndcg@10"] - base["ndcg@10"] > TOLERANCE
        kept_auc = all(v[f"auc.{h}"] >= base[f"auc.{h}"] for h in HEADS)
        if better and kept_auc and v["ndcg@10"] > variants[best]["ndcg@10"]:
            best, reason = name, f"{name} beats the plain sum by more than {TOLERANCE} NDCG@10"
    if "pcgrad" not in variants:
        reason += (
            f"; PCGrad not measured: the task gradients conflict on "
            f"{conflict.get('negative_share', 0.0):.1%} of the traced steps"
        )
    return {"loss": best, "reason": reason}


def _candidates(world: World, user_x: F32, files: Mapping[str, Path], cfg: EvalConfig) -> _Eval:
    """The evaluation's users and ANN candidates (train clicks dropped), as
    ``training.evaluate`` builds them, with the candidates' true expected gains."""
    shipped = _load(files)
    users = _eval_users(world, cfg)
    seen_rows, seen_items = _seen(shipped, users)
    tower = ort.InferenceSession(str(files["user_tower"]), providers=["CPUExecutionProvider"])
    emb = np.asarray(tower.run(None, {"user_features": user_x[users]})[0], dtype=np.float32)
    index = faiss.read_index(str(files["ann_index"]))
    max_seen = int(np.bincount(seen_rows, minlength=users.size).max(initial=0))
    k = min(max(cfg.ann_k, cfg.candidates + max_seen), world.config.n_items)
    _, found = index.search(np.ascontiguousarray(emb), k)
    cand = _drop_seen(found.astype(np.int64), seen_rows, seen_items, cfg.candidates)
    valid = (cand >= 0).ravel()
    flat_users = np.repeat(users, cand.shape[1])
    flat_items = np.maximum(cand.ravel(), 0)
    gains = world.truth.pair_scores(flat_users, flat_items).expected_gain
    return _Eval(
        flat_users,
        flat_items,
        valid,
        np.where(valid, gains, 0.0).astype(np.float64),
        (int(cand.shape[0]), int(cand.shape[1])),
    )


Scorer = Any
"""``(user_rows [B, U], item_rows [B, I]) -> probabilities [B, H]``."""


def _onnx_scorer(path: Path) -> Scorer:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(users: F32, items: F32) -> F32:
        out = session.run(None, {"user_features": users, "item_features": items})[0]
        return np.asarray(out, dtype=np.float32)

    return run


def _torch_scorer(model: MultiTaskRanker) -> Scorer:
    def run(users: F32, items: F32) -> F32:
        with torch.no_grad():
            out = model(torch.from_numpy(users), torch.from_numpy(items))
        return np.asarray(out.numpy(), dtype=np.float32)

    return run


def _predict(scorer: Scorer, user_x: F32, item_x: F32, users: I64, items: I64) -> F32:
    parts = [
        scorer(user_x[users[s : s + _BATCH]], item_x[items[s : s + _BATCH]])
        for s in range(0, users.size, _BATCH)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, len(HEADS)), dtype=np.float32)


def _score(world: World, user_x: F32, setup: _Eval, scorer: Scorer) -> dict[str, float]:
    """Held-out and exploration AUC per head, and NDCG@10 of the head sum."""
    held = world.heldout
    probs = _predict(scorer, user_x, world.item_features, held.users, held.items)
    labels = {"click": held.clicked, "conversion": held.converted}
    explore = held.explored
    out: dict[str, float] = {}
    for k, head in enumerate(HEADS):
        out[f"auc.{head}"] = round(auc(probs[:, k], labels[head]), 6)
        out[f"explore_auc.{head}"] = round(auc(probs[explore, k], labels[head][explore]), 6)
    cand = _predict(scorer, user_x, world.item_features, setup.cand_users, setup.cand_items)
    scores = np.where(setup.valid, cand.sum(axis=1).astype(np.float64), -np.inf)
    value, _ = ndcg_at_k(scores.reshape(setup.shape), setup.gains.reshape(setup.shape), 10)
    out["ndcg@10"] = round(value, 6)
    return out


def _exploration(world: World, user_x: F32, scorer: Scorer) -> dict[str, Any]:
    """A model against the truth on the held-out exploration slice."""
    held = world.heldout
    explore = held.explored
    users, items = held.users[explore], held.items[explore]
    probs = _predict(scorer, user_x, world.item_features, users, items)[:, 0].astype(np.float64)
    truth = world.truth.pair_scores(users, items).click.astype(np.float64)
    error = probs - truth
    half = float(stats.t.ppf(0.975, error.size - 1) * stats.sem(error)) if error.size > 1 else 0.0
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    cross_entropy = -(truth * np.log(p) + (1 - truth) * np.log(1 - p)).mean()
    return {
        "impressions": int(explore.sum()),
        "auc.click": round(auc(probs.astype(np.float32), held.clicked[explore]), 6),
        "mean_predicted": round(float(probs.mean()), 6),
        "mean_true": round(float(truth.mean()), 6),
        "bias": round(float(error.mean()), 6),
        "bias_ci95": [round(float(error.mean()) - half, 6), round(float(error.mean()) + half, 6)],
        "cross_entropy_vs_truth": round(float(cross_entropy), 6),
        "spearman_vs_truth": round(float(stats.spearmanr(probs, truth).statistic), 6),
    }


def _click_rates(world: World, weights: F32) -> dict[str, float]:
    """The training log's click rate: naive, inverse-propensity weighted, exploration slice,
    and the true mean click probability of uniformly random items for the same users."""
    train = world.train
    truth = world.truth.pair_scores(train.users, train.items).click
    explore = train.explored
    w = weights.astype(np.float64)
    return {
        "naive": round(float(train.clicked.mean()), 6),
        "ipw": round(float((w * train.clicked).sum() / w.sum()), 6),
        "exploration_slice": round(float(train.clicked[explore].mean()), 6),
        "true_uniform": round(float(truth[explore].mean()), 6),
    }
