"""``python -m loadtest.feedback_loop``: how the serving loop concentrates impressions over
simulated time on the synthetic world, and what the ranking's exploration share changes.

The mesh feeds its own log back into its answers: the projector's decayed item counters
drive retrieval's **trending** source and re-rank's **recent-CTR** lift, and a user's
clicks leave their candidates (the seen filter). This runs that loop without processes:
every period (one counter half-life, "an hour") each world user asks for ``--slate``
items once, in ``--steps`` batches, and after each batch the shown items' impressions and
clicks (drawn from the world's ground truth) update the counters and the users' histories
the next batch reads. An answer is the mesh's funnel with the set's models:

* candidates: the two-tower's ``ann_k`` (500) nearest items (exact inner product of the
  user tower's embedding with the item embeddings), then the ``trending_k`` (50) items with
  the most decayed clicks (at least 0.1), then the ``popular_k`` (100) most popular, in
  that order, deduplicated, the user's clicked items removed (retrieval's defaults);
* pre-rank (:func:`core.prerank.prerank_scores`) keeps 200, the heavy ranker (ONNX, the
  set's head weights) orders them, the rest follow in pre-rank order;
* re-rank as :mod:`services.ranking.cascade` does it, with its functions: the heavy
  ranker's first 50 get rank relevance ``1 - rank / 50`` plus ``ctr_weight *``
  :func:`~services.ranking.rerank.ctr_lift` of their counters (prior 1 click in 20
  impressions), are re-sorted by it, :func:`~services.ranking.rerank.mmr` (λ 0.7, the item
  categories) picks the slate, and :func:`~core.explore.build_slate` fills
  ``floor(slate * explore_share + 1/2)`` slots from the 100 candidates after them.

Per setting and period: the catalogue coverage and the Gini coefficient of the period's
impressions over every item (:func:`core.experiments.stats.coverage`, :func:`~core
.experiments.stats.gini`), the coverage since the start, the click-through rate and the
share of impressions from trending candidates. The settings (``--settings``) are the mesh's
defaults with exploration shares, one without the recent-CTR lift, and one without the loop
(no recent-CTR lift, no trending source). The tables are printed and written into
``--out`` (``docs/experiments.md``) between the markers of the block ``feedback-loops``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from core.experiments.stats import coverage, gini
from core.explore import build_slate
from core.prerank import load_prerank
from loadtest.harness import machine
from loadtest.reporting import command_line, table, write_block
from mesh.paths import PROJECT_ROOT
from services.ranking.rerank import ctr_lift, mmr
from training.pipeline import world_of
from training.world import World

BLOCK = "feedback-loops"
ANN_K, TRENDING_K, POPULAR_K = 500, 50, 100
TRENDING_MIN_CLICKS = 0.1
PRERANK_KEEP, HEAVY_KEEP, EXPLORE_POOL = 200, 50, 100
MMR_LAMBDA = 0.7
CTR_PRIOR = (1.0, 20.0)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Setting:
    """One run of the loop: the ranking's exploration share, and whether the log feeds back."""

    name: str
    explore_share: float
    ctr_weight: float = 0.1
    trending: bool = True


SETTINGS = {
    "explore-0": Setting("exploration 0 (the mesh's default)", 0.0),
    "explore-0.1": Setting("exploration 0.1", 0.1),
    "explore-0.2": Setting("exploration 0.2", 0.2),
    "no-ctr-lift": Setting("exploration 0, no recent-CTR lift", 0.0, 0.0),
    "no-loop": Setting("exploration 0, no feedback (no CTR lift, no trending)", 0.0, 0.0, False),
}


@dataclass(frozen=True)
class Period:
    """What one period showed."""

    coverage: float
    gini: float
    cumulative_coverage: float
    ctr: float
    trending_share: float
    explored_share: float


class Funnel:
    """The set's models, with what the loop reuses across periods cached per user."""

    def __init__(self, artifact_set: ArtifactSet, world: World) -> None:
        self.world = world
        self.users: F32 = np.asarray(artifact_set.open_array("user_features"), dtype=np.float32)
        self.items: F32 = np.asarray(artifact_set.open_array("item_features"), dtype=np.float32)
        self.categories = np.asarray(artifact_set.open_array("item_categories"), dtype=np.int32)
        self.n_items = int(self.items.shape[0])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        tower = ort.InferenceSession(
            str(artifact_set.file("user_tower")), options, providers=["CPUExecutionProvider"]
        )
        embedding = np.asarray(tower.run(None, {"user_features": self.users})[0])
        item_embeddings = np.asarray(artifact_set.open_array("item_embeddings"), dtype=np.float32)
        self._ranker = ort.InferenceSession(
            str(artifact_set.file("ranker")), options, providers=["CPUExecutionProvider"]
        )
        weighting = artifact_set.config.get("ranker_head_weights", {})
        heads = [str(h) for h in artifact_set.config["ranker_heads"]]
        self._weights = np.array([float(weighting.get(h, 1.0)) for h in heads], dtype=np.float32)
        prerank = load_prerank(artifact_set.file("prerank"))
        # Pre-rank is linear in the item row for a given user: one weight vector per user.
        self._prerank_w: F32 = np.asarray(
            (self.users @ prerank["user_proj"]) @ prerank["item_proj"].T
            + prerank["item_bias"][None, :],
            dtype=np.float32,
        )
        depth = min(self.n_items, 2 * ANN_K)
        self.ann: I64 = np.empty((self.users.shape[0], depth), dtype=np.int64)
        for start in range(0, self.users.shape[0], 256):
            scores = embedding[start : start + 256] @ item_embeddings.T
            top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            self.ann[start : start + 256] = np.take_along_axis(top, order, axis=1)
        popularity = np.asarray(artifact_set.open_array("item_popularity"), dtype=np.float64)
        self.popular: I64 = np.argsort(-popularity, kind="stable")[:POPULAR_K].astype(np.int64)
        self._heavy: list[dict[int, float]] = [{} for _ in range(self.users.shape[0])]

    def prerank(self, user: int, candidates: I64) -> F32:
        return np.asarray(self.items[candidates] @ self._prerank_w[user], dtype=np.float32)

    def heavy(self, user: int, candidates: I64) -> F64:
        """The heavy ranker's weighted score of ``candidates`` for ``user`` (cached)."""
        known = self._heavy[user]
        missing = [i for i in candidates.tolist() if i not in known]
        if missing:
            rows = np.asarray(missing, dtype=np.int64)
            user_x = np.repeat(self.users[user][None, :], rows.size, axis=0)
            out = self._ranker.run(
                None, {"user_features": user_x, "item_features": self.items[rows]}
            )
            for item, score in zip(
                missing, (np.asarray(out[0]) @ self._weights).tolist(), strict=True
            ):
                known[item] = float(score)
        return np.array([known[i] for i in candidates.tolist()], dtype=np.float64)


@dataclass
class LoopState:
    """The log's projections the loop feeds back: decayed counters, histories."""

    impressions: F64
    clicks: F64
    seen: list[set[int]] = field(default_factory=list)


def answer(
    funnel: Funnel,
    state: LoopState,
    trending: I64,
    user: int,
    setting: Setting,
    slate: int,
    rng: np.random.Generator,
) -> tuple[I64, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """One answer: the shown items, which came from trending, which were explored."""
    seen = state.seen[user]
    ann = [i for i in funnel.ann[user].tolist() if i not in seen][:ANN_K]
    merged = dict.fromkeys(ann)
    from_trending = [i for i in trending.tolist() if i not in seen and i not in merged]
    merged.update(dict.fromkeys(from_trending))
    merged.update(dict.fromkeys(i for i in funnel.popular.tolist() if i not in seen))
    candidates = np.fromiter(merged, dtype=np.int64)
    pre_order = np.argsort(-funnel.prerank(user, candidates), kind="stable")
    survivors = pre_order[:PRERANK_KEEP]
    heavy_order = survivors[np.argsort(-funnel.heavy(user, candidates[survivors]), kind="stable")]
    order = np.concatenate([heavy_order, pre_order[PRERANK_KEEP:]])
    pool = order[:HEAVY_KEEP]
    relevance = 1.0 - np.arange(pool.size, dtype=np.float64) / max(1, pool.size)
    categories = funnel.categories[candidates]
    if setting.ctr_weight:
        items = candidates[pool]
        relevance = relevance + setting.ctr_weight * ctr_lift(
            state.clicks[items], state.impressions[items], *CTR_PRIOR
        )
        by_relevance = np.argsort(-relevance, kind="stable")
        pool, relevance = pool[by_relevance], relevance[by_relevance]
    chosen = mmr(pool, categories, min(slate, pool.size), MMR_LAMBDA, relevance=relevance).chosen
    rest = order[~np.isin(order, chosen)]
    shown = build_slate(
        np.concatenate([chosen, rest]), slate, setting.explore_share, EXPLORE_POOL, rng
    )
    items = candidates[shown.positions]
    trending_set = set(from_trending)
    came_from_trending = np.array([i in trending_set for i in items.tolist()], dtype=bool)
    return items, came_from_trending, shown.explored


def run(
    funnel: Funnel,
    setting: Setting,
    periods: int,
    steps: int,
    slate: int,
    seed: int,
    users: int | None = None,
) -> list[Period]:
    """``periods`` periods of the loop under ``setting`` (see the module docstring); each
    period every one of the first ``users`` world users (default all) asks once."""
    rng = np.random.default_rng(seed)
    n_users = funnel.users.shape[0] if users is None else users
    n_items = funnel.n_items
    state = LoopState(np.zeros(n_items), np.zeros(n_items), [set() for _ in range(n_users)])
    decay = 0.5 ** (1.0 / steps)
    ever = np.zeros(n_items, dtype=np.int64)
    out: list[Period] = []
    for _ in range(periods):
        counts = np.zeros(n_items, dtype=np.int64)
        clicks = trending_n = explored_n = 0
        for batch in np.array_split(rng.permutation(n_users), steps):
            if setting.trending:
                eligible = np.flatnonzero(state.clicks >= TRENDING_MIN_CLICKS)
                ranked = eligible[np.argsort(-state.clicks[eligible], kind="stable")]
                trending = ranked[:TRENDING_K]
            else:
                trending = np.zeros(0, dtype=np.int64)
            shown_users, shown_items = [], []
            for user in batch.tolist():
                items, from_trending, explored = answer(
                    funnel, state, trending, user, setting, slate, rng
                )
                shown_users.append(np.full(items.size, user))
                shown_items.append(items)
                trending_n += int(from_trending.sum())
                explored_n += int(explored.sum())
            pair_users = np.concatenate(shown_users)
            pair_items = np.concatenate(shown_items)
            clicked, _ = funnel.world.simulate(
                pair_users, pair_items, seed=int(rng.integers(2**31))
            )
            state.impressions *= decay
            state.clicks *= decay
            np.add.at(state.impressions, pair_items, 1.0)
            np.add.at(state.clicks, pair_items[clicked], 1.0)
            for user, item in zip(
                pair_users[clicked].tolist(), pair_items[clicked].tolist(), strict=True
            ):
                state.seen[user].add(item)
            np.add.at(counts, pair_items, 1)
            clicks += int(clicked.sum())
        ever += counts
        total = int(counts.sum())
        out.append(
            Period(
                coverage=coverage(counts, n_items),
                gini=gini(counts),
                cumulative_coverage=coverage(ever, n_items),
                ctr=clicks / total,
                trending_share=trending_n / total,
                explored_share=explored_n / total,
            )
        )
    return out


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.feedback_loop", description=__doc__)
    parser.add_argument(
        "--artifacts", type=Path, help="an artifact set (default: artifacts/current)"
    )
    parser.add_argument("--periods", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4, help="counter updates per period")
    parser.add_argument("--slate", type=int, default=10)
    parser.add_argument("--users", type=int, help="users asking each period (default: all)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "experiments.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parse(args_list)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.perf_counter()
    path = args.artifacts or resolve_current(PROJECT_ROOT / "artifacts")
    artifact_set = load_artifact_set(path, verify=True)
    world, _ = world_of(artifact_set)
    funnel = Funnel(artifact_set, world)
    chosen = [SETTINGS[name] for name in args.settings.split(",") if name]
    results = {
        s.name: run(funnel, s, args.periods, args.steps, args.slate, args.seed, args.users)
        for s in chosen
    }
    shown_periods = sorted({1, 2, 3, args.periods // 2, args.periods} - {0})
    rows = []
    for name, periods in results.items():
        for t in shown_periods:
            p = periods[t - 1]
            rows.append(
                [
                    name,
                    t,
                    f"{p.coverage:.3f}",
                    f"{p.gini:.3f}",
                    f"{p.cumulative_coverage:.3f}",
                    f"{p.ctr:.4f}",
                    f"{p.trending_share:.3f}",
                    f"{p.explored_share:.3f}",
                ]
            )
    box = machine()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    n_users = funnel.users.shape[0] if args.users is None else args.users
    lines = [
        "```",
        command_line("loadtest.feedback_loop", args_list),
        "```",
        "",
        f"- date: {started}; the run took {time.perf_counter() - began:.0f} s",
        f"- machine: {box['cpu']}, {box['memory']} RAM, {box['os']}; load average {load} at "
        "the end (the machine is shared); commit " + box["commit"],
        f"- artifact set {artifact_set.version}: {world.config.n_users} users, "
        f"{world.config.n_items} items, {world.config.n_categories} categories; {n_users} "
        f"users ask for {args.slate} items once a period, in {args.steps} batches",
        "",
        *table(
            [
                "setting",
                "period",
                "coverage",
                "Gini",
                "coverage since start",
                "CTR",
                "from trending",
                "explored",
            ],
            "lrrrrrrr",
            rows,
        ),
    ]
    write_block(args.out, BLOCK, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
