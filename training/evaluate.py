"""Offline evaluation of a built artifact set against the world's held-out interactions.

Everything is measured on the files that will ship (ONNX models through onnxruntime, the
FAISS index, the pre-ranker arrays), not on the torch models. Evaluation users are those
with at least one held-out click (a seeded sample of at most ``max_users``). Relevant
items of a user are their distinct held-out clicked items; graded gain is 1 per click and
1 more when it converted. Nothing is excluded from rankings (items seen in train may be
retrieved again).

Metric keys:

* ``retrieval.{,popularity_,oracle_}recall@K``: share of a user's held-out clicked items in
  the top K of exact two-tower search / train popularity / ground-truth click probability.
* ``ann.recall@100_vs_exact``: overlap of the ANN index's top 100 with exact search's.
* ``ranking.ndcg@10.{prerank,heavy,oracle}``: NDCG@10 of reordering the ANN's top
  ``candidates`` by the pre-ranker, the heavy ranker's weighted head sum, or the
  ground-truth expected gain, judged by showing every candidate to the user in the world
  (outcomes drawn from the ground truth, seeded; gain 1 per click, 1 more per conversion).
* ``ranking.heldout_ndcg@10.*``: the same orderings judged by the held-out clicks instead.
  These labels carry the logging policy's exposure bias (an item never shown cannot have
  been clicked), which rewards popularity over true preference; read them with that in mind.
* ``ranking.auc.{click,conversion}``: per-head AUC of the heavy ranker on all held-out
  impressions; ``ranking.auc.prerank_click`` likewise for the pre-ranker on clicks.
* ``eval.users``, ``ranking.{,heldout_}ndcg_users``: how many users the averages cover
  (NDCG averages skip users without any gain among their candidates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from training.metrics import auc, ndcg_at_k, recall_at_k, top_k
from training.prerank_model import load_prerank, prerank_pair_scores
from training.world import World

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]

_SCORE_CELLS = 1 << 24
"""User x item score cells computed at once during exhaustive search (64 MiB of float32)."""
_ORT_BATCH = 65536


@dataclass(frozen=True)
class EvalConfig:
    """What to measure and on how many users."""

    max_users: int = 2000
    recall_ks: tuple[int, ...] = (50, 100, 500)
    ann_k: int = 100
    candidates: int = 200
    ndcg_k: int = 10
    head_weights: Mapping[str, float] = field(
        default_factory=lambda: {"click": 1.0, "conversion": 1.0}
    )
    seed: int = 0


def evaluate(
    world: World, files: Mapping[str, Path], heads: tuple[str, ...], config: EvalConfig
) -> dict[str, float]:
    """Metrics (see the module docstring), rounded to 6 decimals, for the artifact files
    ``files`` (manifest key -> path) built from ``world``; ``heads`` is the ranker's output
    column order."""
    user_tower = _session(files["user_tower"])
    ranker = _session(files["ranker"])
    item_emb: F32 = np.load(files["item_embeddings"])
    popularity: F32 = np.load(files["item_popularity"])
    index = faiss.read_index(str(files["ann_index"]))
    prerank = load_prerank(files["prerank"])

    users = _eval_users(world, config)
    relevant = _relevant(world, users)
    user_emb = _run(user_tower, {"user_features": world.user_features[users]})
    max_k = max(*config.recall_ks, config.ann_k)
    exact = _exhaustive_top_k(
        lambda r: user_emb[r] @ item_emb.T, users.size, item_emb.shape[0], max_k
    )
    metrics: dict[str, float] = {"eval.users": float(users.size)}
    metrics.update(_retrieval_metrics(world, users, relevant, exact, popularity, config))

    _, found = index.search(np.ascontiguousarray(user_emb), max(config.ann_k, config.candidates))
    ann = found.astype(np.int64)
    overlap = [
        np.intersect1d(ann[r, : config.ann_k], exact[r, : config.ann_k]).size
        for r in range(users.size)
    ]
    metrics[f"ann.recall@{config.ann_k}_vs_exact"] = float(np.mean(overlap)) / config.ann_k

    candidates = ann[:, : config.candidates]
    metrics.update(
        _ranking_metrics(world, users, candidates, relevant, ranker, prerank, heads, config)
    )
    metrics.update(_auc_metrics(world, ranker, prerank, heads))
    return {k: round(v, 6) for k, v in metrics.items()}


def format_metrics(metrics: Mapping[str, float]) -> str:
    """Metrics as an aligned two-column text table, sorted by key."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, inputs: Mapping[str, F32]) -> F32:
    """Run a single-output session over row batches of aligned ``inputs``."""
    n = next(iter(inputs.values())).shape[0]
    out = [
        session.run(None, {k: v[s : s + _ORT_BATCH] for k, v in inputs.items()})[0]
        for s in range(0, n, _ORT_BATCH)
    ]
    return np.concatenate(out).astype(np.float32, copy=False)


def _eval_users(world: World, config: EvalConfig) -> I64:
    users = np.unique(world.heldout.users[world.heldout.clicked])
    if users.size > config.max_users:
        rng = np.random.default_rng(config.seed)
        users = np.sort(rng.choice(users, size=config.max_users, replace=False))
    return users.astype(np.int64)


def _relevant(world: World, users: I64) -> tuple[I64, I64, NDArray[np.float64]]:
    """Distinct held-out clicked (eval row, item) pairs of ``users`` with their max gain."""
    held = world.heldout.select(world.heldout.clicked & np.isin(world.heldout.users, users))
    rows = np.searchsorted(users, held.users)
    gain = 1.0 + held.converted.astype(np.float64)
    keys = rows * world.config.n_items + held.items
    order = np.lexsort((-gain, keys))
    keys, gain = keys[order], gain[order]
    first = np.r_[True, keys[1:] != keys[:-1]]
    keys, gain = keys[first], gain[first]
    return keys // world.config.n_items, keys % world.config.n_items, gain


def _exhaustive_top_k(
    score_rows: Callable[[I64], NDArray[np.floating]], n_rows: int, n_cols: int, k: int
) -> I64:
    """Top ``k`` columns of each row of an ``[n_rows, n_cols]`` score matrix that is built
    ``score_rows(row indices)`` a chunk at a time to bound memory."""
    chunk = max(1, _SCORE_CELLS // n_cols)
    parts = [
        top_k(score_rows(np.arange(s, min(s + chunk, n_rows))), k) for s in range(0, n_rows, chunk)
    ]
    return np.concatenate(parts)


def _retrieval_metrics(
    world: World,
    users: I64,
    relevant: tuple[I64, I64, NDArray[np.float64]],
    exact: I64,
    popularity: F32,
    config: EvalConfig,
) -> dict[str, float]:
    """Recall@K of the two-tower's exact top items, of popularity and of the oracle."""
    rows, items, _ = relevant
    n_items = world.config.n_items
    all_items = np.arange(n_items)
    max_k = exact.shape[1]
    oracle = _exhaustive_top_k(
        lambda r: world.truth.click_logit_matrix(users[r], all_items), users.size, n_items, max_k
    )
    popular = np.broadcast_to(top_k(popularity[None, :], max_k), exact.shape)
    metrics: dict[str, float] = {}
    for k in config.recall_ks:
        metrics[f"retrieval.recall@{k}"] = recall_at_k(exact, rows, items, k)
        metrics[f"retrieval.popularity_recall@{k}"] = recall_at_k(popular, rows, items, k)
        metrics[f"retrieval.oracle_recall@{k}"] = recall_at_k(oracle, rows, items, k)
    return metrics


def _lookup(keys: I64, values: NDArray[np.float64], queries: I64) -> NDArray[np.float64]:
    """``values`` at ``queries`` positions of the sorted ``keys``; 0 where a query is absent."""
    if keys.size == 0:
        return np.zeros(queries.shape, dtype=np.float64)
    pos = np.minimum(np.searchsorted(keys, queries), keys.size - 1)
    return np.where(keys[pos] == queries, values[pos], 0.0)


def _ranking_metrics(
    world: World,
    users: I64,
    candidates: I64,
    relevant: tuple[I64, I64, NDArray[np.float64]],
    ranker: ort.InferenceSession,
    prerank: Mapping[str, F32],
    heads: tuple[str, ...],
    config: EvalConfig,
) -> dict[str, float]:
    rows, items, gain = relevant
    n_users, n_cand = candidates.shape
    n_items = world.config.n_items
    flat_users = np.repeat(users, n_cand)
    flat_items = candidates.ravel()
    cand_keys = np.repeat(np.arange(n_users), n_cand) * n_items + flat_items
    clicked, converted = world.simulate(flat_users, flat_items, seed=config.seed)
    judgements = {
        "": clicked.astype(np.float64) + converted,
        "heldout_": _lookup(rows * n_items + items, gain, cand_keys),
    }

    user_x = world.user_features[flat_users]
    item_x = world.item_features[flat_items]
    probs = _run(ranker, {"user_features": user_x, "item_features": item_x})
    weights = np.array([config.head_weights.get(h, 0.0) for h in heads], dtype=np.float32)
    scorers = {
        "prerank": prerank_pair_scores(prerank, user_x, item_x),
        "heavy": probs @ weights,
        "oracle": world.truth.pair_scores(flat_users, flat_items).expected_gain,
    }
    metrics: dict[str, float] = {}
    k = config.ndcg_k
    for prefix, gains in judgements.items():
        for name, scores in scorers.items():
            value, n_rated = ndcg_at_k(
                scores.reshape(n_users, n_cand), gains.reshape(n_users, n_cand), k
            )
            metrics[f"ranking.{prefix}ndcg@{k}.{name}"] = value
        metrics[f"ranking.{prefix}ndcg_users"] = float(n_rated)
    return metrics


def _auc_metrics(
    world: World, ranker: ort.InferenceSession, prerank: Mapping[str, F32], heads: tuple[str, ...]
) -> dict[str, float]:
    held = world.heldout
    user_x = world.user_features[held.users]
    item_x = world.item_features[held.items]
    probs = _run(ranker, {"user_features": user_x, "item_features": item_x})
    labels = {"click": held.clicked, "conversion": held.converted}
    metrics = {f"ranking.auc.{h}": auc(probs[:, i], labels[h]) for i, h in enumerate(heads)}
    pre = prerank_pair_scores(prerank, user_x, item_x)
    metrics["ranking.auc.prerank_click"] = auc(pre, held.clicked)
    return metrics
