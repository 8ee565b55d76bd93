"""Offline evaluation of a built artifact set against the world it was trained on.

Everything is measured on the files that ship (ONNX models through onnxruntime, the FAISS
index, the pre-ranker arrays, the user and item feature files, the users' click
histories), not on the torch models; the world (regenerated from the manifest's seed and
config) supplies only the ground truth and the held-out logs. Evaluation users are a
seeded sample of at most ``max_users`` users.

**What is measured, and why.** The logged held-out clicks are a poor yardstick: an item can
only be clicked if the logging policy showed it, and that policy favoured popular items
and the user's favourite categories, so on them the ground-truth oracle barely beats
popularity. What a user cares about is whether the items put in front of them are ones
they would click. The logs therefore carry an exploration slice (uniformly random items,
:data:`training.world.EXPLORATION_SHARE` of impressions): its clicks are free of exposure
bias, a click landing on item i with probability proportional to the user's P(click | i
shown). Recall of held-out exploration clicks is the right measure, but a few clicks per
user make it noisy; since the world knows P(click | shown), the evaluation computes its
expectation exactly instead:

    recall@K(u) = sum over i in top K of p(u, i)  /  sum over all unseen i of p(u, i)

the share of the clicks the user would make if every item were shown once that the top K
would capture. Items the user clicked in training are excluded from every list and from
the denominator, as the retrieval service drops them. Likewise, ranking quality is the
NDCG@10 of each ordering of the candidates with each candidate's ground-truth expected
gain (P(click) + P(click and conversion)) as its gain: the expected DCG of the shown list
relative to the best ordering of the same candidates. Both are noise-free, so differences
between models are not sampling luck.

Metric keys:

* ``retrieval.recall@K``, ``retrieval.{popularity,oracle,feature_oracle}_recall@K``: the
  expected recall above for exact two-tower search over the shipped embeddings, train
  popularity, ground-truth click probability, and the feature-limited oracle
  (:mod:`training.reference`).
* ``retrieval.logged.{recall,popularity_recall,oracle_recall}@100``: the old,
  exposure-biased measure, for comparison: share of a user's distinct held-out logged
  clicks (not clicked in train) found in the top 100.
* ``ann.recall@100_vs_exact``: overlap of the ANN index's top 100 with exact search's.
* ``ranking.ndcg@10.{prerank,heavy,oracle,feature_oracle,retrieval,random}``: NDCG@10 of
  reordering each user's ``candidates`` (the ANN's top items, train clicks dropped) by the
  pre-ranker, the heavy ranker's weighted head sum, the ground-truth expected gain (1 by
  construction), the feature-limited oracle's expected gain, the retrieval order, and a
  seeded random order.
* ``ranking.auc.{click,conversion}`` (heavy ranker per head), ``ranking.auc.prerank_click``
  and ``ranking.auc.oracle_{click,conversion}`` on all held-out impressions (logged, so
  exposure-biased); ``ranking.explore_auc.{click,conversion}`` on the held-out
  exploration impressions only.
* ``eval.users``: how many users the retrieval and ranking averages cover.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from core.prerank import load_prerank, prerank_pair_scores
from training.metrics import auc, ndcg_at_k, recall_at_k, top_k
from training.reference import feature_oracle
from training.world import GroundTruth, World

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]

_SCORE_CELLS = 1 << 23
"""User x item cells scored at once during exhaustive search (32 MiB per float32 matrix)."""
_ORT_BATCH = 65536
LOGGED_K = 100


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

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``config.evaluation`` entry; :meth:`from_manifest` inverts it."""
        return {
            "max_users": self.max_users,
            "recall_ks": list(self.recall_ks),
            "ann_k": self.ann_k,
            "candidates": self.candidates,
            "ndcg_k": self.ndcg_k,
            "head_weights": dict(self.head_weights),
            "seed": self.seed,
        }

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> EvalConfig:
        default = cls()
        return cls(
            max_users=int(entry.get("max_users", default.max_users)),
            recall_ks=tuple(int(k) for k in entry.get("recall_ks", default.recall_ks)),
            ann_k=int(entry.get("ann_k", default.ann_k)),
            candidates=int(entry.get("candidates", default.candidates)),
            ndcg_k=int(entry.get("ndcg_k", default.ndcg_k)),
            head_weights={
                str(k): float(v) for k, v in entry.get("head_weights", default.head_weights).items()
            },
            seed=int(entry.get("seed", default.seed)),
        )


@dataclass(frozen=True)
class _Shipped:
    """The arrays of an artifact set that evaluation reads."""

    user_features: F32
    item_features: F32
    item_embeddings: F32
    popularity: F32
    history_indptr: I64
    history_items: I64
    heldout_users: I64
    heldout_items: I64


def evaluate(
    world: World, files: Mapping[str, Path], heads: tuple[str, ...], config: EvalConfig
) -> dict[str, float]:
    """Metrics (see the module docstring), rounded to 6 decimals, for the artifact files
    ``files`` (manifest key -> path) built from ``world``; ``heads`` is the ranker's output
    column order."""
    user_tower = _session(files["user_tower"])
    ranker = _session(files["ranker"])
    index = faiss.read_index(str(files["ann_index"]))
    prerank = load_prerank(files["prerank"])
    shipped = _load(files)
    reference = feature_oracle(world, shipped.user_features, shipped.item_features)

    users = _eval_users(world, config)
    seen_rows, seen_items = _seen(shipped, users)
    user_emb = _run(user_tower, {"user_features": shipped.user_features[users]})
    metrics: dict[str, float] = {"eval.users": float(users.size)}
    lists = _ranked_lists(world, reference, shipped, users, user_emb, seen_rows, seen_items, config)
    metrics.update(lists.metrics)
    metrics.update(_logged_recall(shipped, users, seen_rows, seen_items, lists.top))

    max_seen = int(np.bincount(seen_rows, minlength=users.size).max(initial=0))
    n_items = shipped.item_embeddings.shape[0]
    k_search = min(max(config.ann_k, config.candidates + max_seen), n_items)
    _, found = index.search(np.ascontiguousarray(user_emb), k_search)
    ann = found.astype(np.int64)
    overlap = [
        np.intersect1d(ann[r, : config.ann_k], lists.exact_unfiltered[r]).size
        for r in range(users.size)
    ]
    metrics[f"ann.recall@{config.ann_k}_vs_exact"] = float(np.mean(overlap)) / config.ann_k

    candidates = _drop_seen(ann, seen_rows, seen_items, config.candidates)
    metrics.update(
        _ranking_metrics(
            world, reference, shipped, users, candidates, ranker, prerank, heads, config
        )
    )
    metrics.update(_auc_metrics(world, shipped, ranker, prerank, heads))
    return {k: round(v, 6) for k, v in metrics.items()}


def format_metrics(metrics: Mapping[str, float], stored: Mapping[str, float] | None = None) -> str:
    """Metrics as an aligned text table sorted by key; with ``stored``, a second column
    of those values and a ``!`` on rows where the two differ."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    if stored is None:
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
        lines += [f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
        return "\n".join(lines)
    lines = [f"{'metric':<{width}}  value    stored", f"{'-' * width}  ------  ------"]
    for k, v in sorted(metrics.items()):
        old = stored.get(k)
        shown = "     -" if old is None else f"{old:.4f}"
        flag = "" if old is not None and _same(old, v) else "  !"
        lines.append(f"{k:<{width}}  {v:.4f}  {shown}{flag}")
    return "\n".join(lines)


def _same(a: float, b: float) -> bool:
    return (np.isnan(a) and np.isnan(b)) or a == b


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


def _load(files: Mapping[str, Path]) -> _Shipped:
    with np.load(files["user_history"]) as history, np.load(files["heldout"]) as heldout:
        return _Shipped(
            user_features=np.load(files["user_features"]),
            item_features=np.load(files["item_features"]),
            item_embeddings=np.load(files["item_embeddings"]),
            popularity=np.load(files["item_popularity"]),
            history_indptr=np.asarray(history["indptr"], dtype=np.int64),
            history_items=np.asarray(history["items"], dtype=np.int64),
            heldout_users=np.asarray(heldout["users"], dtype=np.int64),
            heldout_items=np.asarray(heldout["items"], dtype=np.int64),
        )


def _eval_users(world: World, config: EvalConfig) -> I64:
    users = np.arange(world.config.n_users, dtype=np.int64)
    if users.size > config.max_users:
        rng = np.random.default_rng(config.seed)
        users = np.sort(rng.choice(users, size=config.max_users, replace=False))
    return users


def _seen(shipped: _Shipped, users: I64) -> tuple[I64, I64]:
    """(eval row, item) pairs of the users' train clicks, from the shipped histories."""
    starts, stops = shipped.history_indptr[users], shipped.history_indptr[users + 1]
    rows = np.repeat(np.arange(users.size), stops - starts)
    items = np.concatenate(
        [shipped.history_items[a:b] for a, b in zip(starts, stops, strict=True)]
        or [np.zeros(0, dtype=np.int64)]
    )
    return rows.astype(np.int64), items.astype(np.int64)


@dataclass(frozen=True)
class _Lists:
    metrics: dict[str, float]
    top: dict[str, I64]
    """Top ``LOGGED_K`` (seen dropped) of the two-tower, popularity and the oracle."""
    exact_unfiltered: I64
    """Exact two-tower top ``ann_k`` with nothing dropped, to judge the ANN index."""


def _ranked_lists(
    world: World,
    reference: GroundTruth,
    shipped: _Shipped,
    users: I64,
    user_emb: F32,
    seen_rows: I64,
    seen_items: I64,
    config: EvalConfig,
) -> _Lists:
    """Expected recall@K of every retrieval method, a chunk of users at a time."""
    n_items = shipped.item_embeddings.shape[0]
    all_items = np.arange(n_items)
    max_k = min(max(*config.recall_ks, LOGGED_K), n_items)
    chunk = max(1, _SCORE_CELLS // n_items)
    popularity = shipped.popularity.astype(np.float32)
    names = ("", "popularity_", "oracle_", "feature_oracle_")
    recall: dict[str, list[NDArray[np.float64]]] = {
        f"{name}{k}": [] for name in names for k in config.recall_ks
    }
    top: dict[str, list[I64]] = {"two_tower": [], "popularity": [], "oracle": []}
    exact: list[I64] = []
    for start in range(0, users.size, chunk):
        rows = np.arange(start, min(start + chunk, users.size))
        in_chunk = (seen_rows >= rows[0]) & (seen_rows <= rows[-1])
        mask = (seen_rows[in_chunk] - rows[0], seen_items[in_chunk])
        logits = world.truth.click_logit_matrix(users[rows], all_items)
        relevance = 1.0 / (1.0 + np.exp(-logits))
        relevance[mask] = 0.0
        total = relevance.sum(axis=1, dtype=np.float64)
        two_tower = user_emb[rows] @ shipped.item_embeddings.T
        exact.append(top_k(two_tower, config.ann_k))
        scores = {
            "": two_tower,
            "popularity_": np.repeat(popularity[None, :], rows.size, axis=0),
            "oracle_": logits,
            "feature_oracle_": reference.click_logit_matrix(users[rows], all_items),
        }
        for name, s in scores.items():
            s[mask] = -np.inf
            ranked = top_k(s, max_k)
            gained = np.cumsum(np.take_along_axis(relevance, ranked, axis=1), axis=1)
            for k in config.recall_ks:
                recall[f"{name}{k}"].append(gained[:, min(k, max_k) - 1] / total)
            if name == "":
                top["two_tower"].append(ranked[:, :LOGGED_K])
            elif name in ("popularity_", "oracle_"):
                top[name[:-1]].append(ranked[:, :LOGGED_K])
    metrics = {
        f"retrieval.{name}recall@{k}": float(np.mean(np.concatenate(recall[f"{name}{k}"])))
        for name in names
        for k in config.recall_ks
    }
    return _Lists(
        metrics=metrics,
        top={name: np.concatenate(parts) for name, parts in top.items()},
        exact_unfiltered=np.concatenate(exact),
    )


def _logged_recall(
    shipped: _Shipped, users: I64, seen_rows: I64, seen_items: I64, top: Mapping[str, I64]
) -> dict[str, float]:
    """Recall@100 of the held-out logged clicks (exposure-biased; for comparison only)."""
    keep = np.isin(shipped.heldout_users, users)
    rows = np.searchsorted(users, shipped.heldout_users[keep])
    items = shipped.heldout_items[keep]
    width = int(max(shipped.item_embeddings.shape[0], 1))
    keys = np.unique(rows * width + items)
    keys = keys[~np.isin(keys, seen_rows * width + seen_items)]
    rows, items = keys // width, keys % width
    names = {"two_tower": "recall", "popularity": "popularity_recall", "oracle": "oracle_recall"}
    return {
        f"retrieval.logged.{names[name]}@{LOGGED_K}": recall_at_k(ranked, rows, items, LOGGED_K)
        for name, ranked in top.items()
    }


def _drop_seen(ann: I64, seen_rows: I64, seen_items: I64, n: int) -> I64:
    """Per row, the first ``n`` ids of ``ann`` that are valid (>= 0) and not seen; rows
    short of ``n`` are padded with -1."""
    width = int(max(ann.max(initial=0), seen_items.max(initial=0))) + 1
    keys = np.arange(ann.shape[0])[:, None] * width + np.maximum(ann, 0)
    keep = (ann >= 0) & ~np.isin(keys, seen_rows * width + seen_items)
    out = np.full((ann.shape[0], n), -1, dtype=np.int64)
    for r in range(ann.shape[0]):
        valid = ann[r][keep[r]][:n]
        out[r, : valid.size] = valid
    return out


def _ranking_metrics(
    world: World,
    reference: GroundTruth,
    shipped: _Shipped,
    users: I64,
    candidates: I64,
    ranker: ort.InferenceSession,
    prerank: Mapping[str, F32],
    heads: tuple[str, ...],
    config: EvalConfig,
) -> dict[str, float]:
    n_users, n_cand = candidates.shape
    valid = (candidates >= 0).ravel()
    flat_users = np.repeat(users, n_cand)
    flat_items = np.maximum(candidates.ravel(), 0)
    gains = np.where(valid, world.truth.pair_scores(flat_users, flat_items).expected_gain, 0.0)

    user_x = shipped.user_features[flat_users]
    item_x = shipped.item_features[flat_items]
    probs = _run(ranker, {"user_features": user_x, "item_features": item_x})
    weights = np.array([config.head_weights.get(h, 0.0) for h in heads], dtype=np.float32)
    rng = np.random.default_rng(config.seed)
    scorers: dict[str, NDArray[np.floating]] = {
        "prerank": prerank_pair_scores(prerank, user_x, item_x),
        "heavy": probs @ weights,
        "oracle": world.truth.pair_scores(flat_users, flat_items).expected_gain,
        "feature_oracle": reference.pair_scores(flat_users, flat_items).expected_gain,
        "retrieval": -np.tile(np.arange(n_cand, dtype=np.float64), n_users),
        "random": rng.random(flat_items.size),
    }
    metrics: dict[str, float] = {}
    k = config.ndcg_k
    for name, scores in scorers.items():
        masked = np.where(valid, scores.astype(np.float64), -np.inf)
        value, _ = ndcg_at_k(masked.reshape(n_users, n_cand), gains.reshape(n_users, n_cand), k)
        metrics[f"ranking.ndcg@{k}.{name}"] = value
    return metrics


def _auc_metrics(
    world: World,
    shipped: _Shipped,
    ranker: ort.InferenceSession,
    prerank: Mapping[str, F32],
    heads: tuple[str, ...],
) -> dict[str, float]:
    held = world.heldout
    user_x = shipped.user_features[held.users]
    item_x = shipped.item_features[held.items]
    probs = _run(ranker, {"user_features": user_x, "item_features": item_x})
    oracle = world.truth.pair_scores(held.users, held.items)
    labels = {"click": held.clicked, "conversion": held.converted}
    explore = held.explored
    metrics: dict[str, float] = {}
    for i, h in enumerate(heads):
        metrics[f"ranking.auc.{h}"] = auc(probs[:, i], labels[h])
        metrics[f"ranking.explore_auc.{h}"] = auc(probs[explore, i], labels[h][explore])
    metrics["ranking.auc.prerank_click"] = auc(
        prerank_pair_scores(prerank, user_x, item_x), held.clicked
    )
    metrics["ranking.auc.oracle_click"] = auc(oracle.click, held.clicked)
    metrics["ranking.auc.oracle_conversion"] = auc(oracle.conversion, held.converted)
    return metrics
