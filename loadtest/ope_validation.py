"""``python -m loadtest.ope_validation``: off-policy evaluation validated on the synthetic
world, where every policy's true CTR is known exactly.

A small set is trained (``--users`` by ``--items``, in ``--work`` or a temporary root;
``--artifacts DIR`` uses an existing set instead) and a second one on the same world with
another training seed (the "another set" candidate). Then ``--replications`` times:

1. the logging policy (the set's simulated serve with its defaults: 100 uniformly drawn
   candidates, the ranker's best 9, one exploration slot) answers ``--answers`` requests
   (:func:`training.simulate.simulate_serve`, its own seed each time);
2. the events are read back as the log would hold them (:func:`training.log_data
   .build_examples` over the events in append order), clicks joined by request and item;
3. each candidate policy's CTR is estimated from that log (:func:`training.ope.evaluate`:
   naive, IPS, SNIPS, DR, 95 % intervals, the default weight cap and ``--clips``).

With ``--logger mesh`` the logging policy explores the mesh's way (the ranking service's
:func:`core.explore.build_slate`: 2 of 10 slots drawn from the 20 candidates after the 8
ranked ones, probabilities given them and each answer's support logged), and the candidates
are final stages over the logged supports (:class:`training.ope.RerankPolicy`, estimated by
:func:`training.ope.evaluate_rerank`); their truth is the mean over ``--truth-answers``
answers of the logger (:func:`training.ope.true_rerank_ctr`), the distribution of (user,
support) the estimates are about; the tables go to the block ``ope-validation-mesh``.

Each candidate's true CTR is computed exactly (:func:`training.ope.true_ctr`). Per
candidate and estimator the tables give the mean estimate, its bias, the RMSE, the mean
interval width and the share of replications whose interval covers the truth, with that
share's 95 % Clopper-Pearson interval (``scipy.stats.binomtest``). The tables are printed
and written into ``--out`` (``docs/experiments.md``) between the markers of the block
``ope-validation`` (:func:`loadtest.reporting.write_block`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy
from recmesh.events.v1 import events_pb2
from scipy import stats as sps

from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from core.experiments.ope import DEFAULT_CLIP, OffPolicyEstimate
from core.replay import Stored
from loadtest.harness import machine
from loadtest.reporting import command_line, table, write_block
from mesh.paths import PROJECT_ROOT
from training.log_data import build_examples
from training.ope import (
    LoggedImpressions,
    RerankPolicy,
    estimate,
    true_ctr,
    true_rerank_ctr,
)
from training.pipeline import TrainConfig, train, world_of
from training.simulate import Ranker, ServeConfig, ServePolicy, simulate_serve

BLOCK = "ope-validation"
MESH_LOGGER = ServeConfig(explore_slots=2, explore_pool=20)
"""The mesh-way logger: the ranker's best 8 of 100 candidates, 2 slots from the next 20."""
ESTIMATORS = ("naive", "ips", "snips", "dr")
LABELS = {"naive": "naive", "ips": "IPS", "snips": "SNIPS", "dr": "DR"}
START_MS = 1_700_000_000_000
HEADER = ["candidate", "estimator", "true CTR", "mean", "bias", "RMSE", "CI width", "coverage"]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ope_validation", description=__doc__)
    parser.add_argument("--artifacts", type=Path, help="an existing set (default: train one)")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--replications", type=int, default=500)
    parser.add_argument("--answers", type=int, default=1000, help="answers per logged run")
    parser.add_argument(
        "--clips", default="5,20", help="extra weight caps to report (comma-separated)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--logger",
        choices=("serve", "mesh"),
        default="serve",
        help="serve: marginal propensities over the catalogue; mesh: the ranking service's "
        "way, supports logged, final-stage candidates",
    )
    parser.add_argument(
        "--truth-answers",
        type=int,
        default=100_000,
        help="--logger mesh: answers the candidates' true CTR is averaged over",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="where the two sets are trained, reused when there (default: a temporary directory)",
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "experiments.md")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Candidate:
    name: str
    policy: ServePolicy | RerankPolicy


def candidates(logging_set: ArtifactSet, other_set: ArtifactSet) -> list[Candidate]:
    """The candidate policies evaluated against the logging policy's log."""
    ranker = Ranker(logging_set)
    return [
        Candidate("the logging policy itself", ServePolicy(ranker, ServeConfig(), cache=True)),
        Candidate(
            "300 candidates (exploits harder)",
            ServePolicy(ranker, ServeConfig(candidates=300), cache=True),
        ),
        Candidate(
            "click head only",
            ServePolicy(Ranker(logging_set, {"click": 1.0}), ServeConfig(), cache=True),
        ),
        Candidate(
            "3 exploration slots", ServePolicy(ranker, ServeConfig(explore_slots=3), cache=True)
        ),
        Candidate(
            "another set (train seed 1)", ServePolicy(Ranker(other_set), ServeConfig(), cache=True)
        ),
    ]


def mesh_candidates(logging_set: ArtifactSet, other_set: ArtifactSet) -> list[Candidate]:
    """Final stages over the mesh-way logger's supports."""
    ranker = Ranker(logging_set)
    share = MESH_LOGGER.explore_slots / MESH_LOGGER.slate
    support = MESH_LOGGER.ranked_slots + MESH_LOGGER.explore_pool

    def stage(name: str, chosen: Ranker, share: float, pool: int, logged: bool) -> Candidate:
        policy = RerankPolicy(
            chosen, slate=10, explore_share=share, explore_pool=pool, keep_order=logged, cache=True
        )
        return Candidate(name, policy)

    return [
        stage("the logging policy itself", ranker, share, MESH_LOGGER.explore_pool, True),
        stage("logged order, no exploration", ranker, 0.0, 0, True),
        stage("click head only, no exploration", Ranker(logging_set, {"click": 1.0}), 0, 0, False),
        stage(
            "another set (train seed 1)", Ranker(other_set), share, MESH_LOGGER.explore_pool, False
        ),
        stage("uniform over the support", ranker, 1.0, support, True),
    ]


def read_back(
    events: Sequence[events_pb2.Event], artifact_set: ArtifactSet, mesh: bool
) -> LoggedImpressions:
    """The events as the log holds them, through the log reader's join."""
    entries: list[Stored] = [(f"{event.ts_ms}-{k}", event) for k, event in enumerate(events)]
    examples = build_examples(
        entries,
        tenant="ope",
        n_users=int(artifact_set.open_array("user_features").shape[0]),
        item_categories=artifact_set.open_array("item_categories"),
        history_cap=1,
    )
    if mesh:
        n_items = int(artifact_set.open_array("item_categories").shape[0])
        return LoggedImpressions.from_supported(examples, n_items, MESH_LOGGER.slate)
    return LoggedImpressions.from_examples(examples)


def sets(args: argparse.Namespace, scratch: Path) -> tuple[ArtifactSet, ArtifactSet]:
    """The logging set and the "another set" candidate's (same world, train seed 1)."""
    if args.artifacts is not None:
        logging_set = load_artifact_set(args.artifacts, verify=True)
        world = logging_set.config["world"]
        users, items = int(world["n_users"]), int(world["n_items"])
        categories, data_seed = int(world["n_categories"]), int(world["seed"])
    else:
        users, items, categories, data_seed = args.users, args.items, 30, args.seed
    base = TrainConfig(
        n_users=users,
        n_items=items,
        n_categories=categories,
        data_seed=data_seed,
        progress=False,
        evaluate=False,
    )
    if args.artifacts is None:
        if not (scratch / "logging" / "current").exists():
            train(scratch / "logging", base)
        logging_set = load_artifact_set(resolve_current(scratch / "logging"))
    if not (scratch / "other" / "current").exists():
        train(scratch / "other", dataclasses.replace(base, train_seed=1))
    return logging_set, load_artifact_set(resolve_current(scratch / "other"))


def summary(name: str, truth: float, runs: list[OffPolicyEstimate], estimator: str) -> list[object]:
    intervals = [getattr(r, estimator) for r in runs]
    estimates = np.array([i.estimate for i in intervals])
    widths = np.array([i.high - i.low for i in intervals])
    hits = sum(i.covers(truth) for i in intervals)
    low, high = sps.binomtest(hits, len(runs)).proportion_ci(0.95, method="exact")
    return [
        name,
        LABELS[estimator],
        f"{truth:.4f}",
        f"{estimates.mean():.4f}",
        f"{estimates.mean() - truth:+.4f}",
        f"{np.sqrt(((estimates - truth) ** 2).mean()):.4f}",
        f"{widths.mean():.4f}",
        f"**{hits / len(runs):.3f}** ({low:.3f} to {high:.3f})",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parse(args_list)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.perf_counter()
    clips = [float(c) for c in args.clips.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="ope-") as scratch:
        logging_set, other_set = sets(args, args.work or Path(scratch))
        world, _ = world_of(logging_set)
        mesh = args.logger == "mesh"
        shape = MESH_LOGGER if mesh else ServeConfig()
        logger = ServePolicy(Ranker(logging_set), shape, cache=True)
        if mesh:
            policies = mesh_candidates(logging_set, other_set)
            # Seeds of the replications are seed * 100_000 + rep: this one is none of them.
            sample = dataclasses.replace(shape, requests=args.truth_answers, seed=10**9 + args.seed)
            big = read_back(
                simulate_serve(logging_set, world, sample, START_MS, logger), logging_set, True
            )
        else:
            policies = candidates(logging_set, other_set)

        def truth(policy: ServePolicy | RerankPolicy) -> float:
            if isinstance(policy, RerankPolicy):
                return true_rerank_ctr(big, policy, world)
            return true_ctr(policy, world, shape.unknown_share)

        truths = [truth(c.policy) for c in policies]
        prepared = time.perf_counter() - began
        runs: dict[tuple[int, float], list[OffPolicyEstimate]] = {}
        for rep in range(args.replications):
            config = dataclasses.replace(
                shape, requests=args.answers, seed=args.seed * 100_000 + rep
            )
            events = simulate_serve(logging_set, world, config, START_MS, policy=logger)
            log = read_back(events, logging_set, mesh)
            for k, candidate in enumerate(policies):
                for clip in [DEFAULT_CLIP, *clips]:
                    result = estimate(log, candidate.policy, clip=clip)
                    runs.setdefault((k, clip), []).append(result)
    rows = []
    for k, candidate in enumerate(policies):
        for estimator in ESTIMATORS:
            rows.append(summary(candidate.name, truths[k], runs[(k, DEFAULT_CLIP)], estimator))
    ess_rows = []
    for k, candidate in enumerate(policies):
        default = runs[(k, DEFAULT_CLIP)]
        ess_rows.append(
            [
                candidate.name,
                f"{np.mean([r.effective_sample_size for r in default]):.0f}",
                f"{np.mean([r.mean_weight for r in default]):.3f}",
                f"{np.max([r.max_weight for r in default]):.1f}",
            ]
            + [f"{np.mean([r.clipped / r.impressions for r in runs[(k, c)]]):.2%}" for c in clips]
        )
    clip_rows = []
    for k, candidate in enumerate(policies):
        if max(r.max_weight for r in runs[(k, DEFAULT_CLIP)]) <= min(clips, default=0.0):
            continue  # no cap binds: the rows would repeat the first table's
        for clip in clips:
            for estimator in ("ips", "snips", "dr"):
                clip_rows.append(
                    summary(
                        f"{candidate.name}, cap {clip:g}", truths[k], runs[(k, clip)], estimator
                    )
                )
    box = machine()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    world_cfg = world.config
    lines = [
        "```",
        command_line("loadtest.ope_validation", args_list),
        "```",
        "",
        f"- date: {started}; the run took {time.perf_counter() - began:.0f} s "
        f"({prepared:.0f} s of it training the two sets and scoring every context)",
        f"- machine: {box['cpu']}, {box['memory']} RAM, {box['os']}; load average {load} at "
        "the end (the machine is shared)",
        f"- software: Python {box['python']}, numpy {np.__version__}, scipy {scipy.__version__}; "
        f"commit {box['commit']}",
        f"- world: {world_cfg.n_users} users, {world_cfg.n_items} items, "
        f"{world_cfg.n_categories} categories, data seed {world_cfg.seed}; logging set "
        f"{logging_set.version}",
        f"- {args.replications} logged runs of {args.answers} answers (10 impressions each, 5 % "
        "of them to unknown users), each read back through the log reader's join; default "
        f"weight cap {DEFAULT_CLIP:g}",
        *(
            [
                "- logged the mesh's way: 8 ranked of 100 candidates, 2 slots drawn from the "
                "next 20 (probability 0.1), supports logged; candidates are final stages over "
                f"the supports; true CTRs over {args.truth_answers} answers of the logger"
            ]
            if mesh
            else []
        ),
        "",
        "Coverage of the 95 % intervals, per candidate and estimator (coverage: share of runs "
        "whose interval holds the true CTR, with its 95 % Clopper-Pearson interval):",
        "",
        *table(
            HEADER,
            "llrrrrrl",
            rows,
        ),
        "",
        "Weights (mean over runs; share of impressions clipped at each extra cap):",
        "",
        *table(
            ["candidate", "effective sample size", "mean weight", "max weight"]
            + [f"clipped at {c:g}" for c in clips],
            "lrrr" + "r" * len(clips),
            ess_rows,
        ),
        "",
        "Lower caps, for the candidates whose weights reach them (bias against variance):",
        "",
        *table(
            [
                "candidate, cap",
                "estimator",
                "true CTR",
                "mean",
                "bias",
                "RMSE",
                "CI width",
                "coverage",
            ],
            "llrrrrrl",
            clip_rows,
        ),
    ]
    write_block(args.out, f"{BLOCK}-mesh" if mesh else BLOCK, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
