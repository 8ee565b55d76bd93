"""``python -m loadtest.interleaving``: how many users team-draft interleaving needs to tell
two rankers apart, against a plain A/B test on CTR, on the synthetic world whose click
probabilities are known (:mod:`core.experiments.interleaving`, ``docs/experiments.md``).

**The rankers.** An artifact set (``--artifacts``, default the served one) and the world it
was trained on (regenerated from its manifest). Each world user's candidates are the
set's two-tower top ``--candidates`` (exact inner product over the shipped embeddings, the
user's train clicks dropped, as retrieval does), and each ranker orders them: ``heavy``
(the ONNX ranker's weighted heads), ``prerank`` (the numpy pre-ranker), ``retrieval`` (the
two-tower score), and ``heavy_click`` (the ranker's click head alone). The first 10 of each
are its list. A user's candidates are the same at
every request (as retrieval's are, give or take trending items), so their requests share
their lists and only the coins and the clicks differ.

**The truth.** The world's click probability ``p(u, i)`` of each candidate, and NDCG@10 of
each ranker's list over the candidates with ``p`` as the gain (what clicks can reveal;
the set's manifest reports NDCG@10 with ``p(click) + p(conversion)`` as the gain, close
to it). Clicks follow a position-based model: an item at position ``r`` (0-based) is
examined with probability ``1 / log2(r + 2)``, the DCG discount, and clicked if examined
with probability ``p``; so a list's expected clicks are its DCG and the world's NDCG
difference is what both tests are after.

**An experiment of N users** samples N world users with replacement; each makes
``1 + Poisson(requests_per_user * activity - 1)`` requests (``activity`` the world's hidden
activity level, mean 1; at least one request, ``--requests-per-user`` on average).

* Interleaving: every request shows the team draft of A's and B's lists (one of the 32
  equally likely coin sequences of 5 rounds); clicks credit the team that picked the item;
  a request is won by the team with more clicked items. Detected when the two-sided sign
  test (``scipy.stats.binomtest``) gives ``p < alpha`` in the right direction, on
  requests and, separately, on users (each user's net wins vote).
* A/B: half the users see A's list at each of their requests, half B's; CTR per arm is
  clicks per impression, compared with the delta method
  (:func:`core.experiments.stats.compare_ratio`); detected when ``p < alpha`` in the right
  direction.

Each size runs ``--runs`` experiments: the detection rate (with its 95 % Wilson interval,
``statsmodels``), for each pair of ``--pairs`` (``A:B``; ``heavy:heavy`` is an A/A check:
its rate is the false-positive rate). The users needed for 80 % power are interpolated
(linear in log N) between the two sizes around it. A size is skipped for a method once
it detected in at least 99.5 % of runs at two smaller sizes.

The tables are printed and written into ``--out`` (``docs/experiments.md``) between the
markers of the block ``interleaving`` (:func:`loadtest.reporting.write_block`), and the
figures as JSON into ``--json`` (``docs/bench/interleaving.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import scipy
from statsmodels.stats.proportion import proportion_confint

from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from core.experiments.interleaving import TEAM_A, sign_test, team_draft
from core.experiments.stats import compare_ratio
from core.prerank import load_prerank, prerank_pair_scores
from loadtest.harness import machine
from loadtest.reporting import command_line, table, write_block
from mesh.paths import PROJECT_ROOT
from training.metrics import ndcg_at_k
from training.world import World, WorldConfig, generate_world

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

BLOCK = "interleaving"
SLOTS = 10
ROUNDS = SLOTS // 2
COINS = 2**ROUNDS
EXAMINATION = 1.0 / np.log2(np.arange(2, SLOTS + 2))
"""Probability that the item at each position is examined: the DCG discount."""
RANKERS = ("heavy", "heavy_click", "prerank", "retrieval")
SKIP_AT = 0.995
POWER = 0.8


@dataclass(frozen=True)
class Lists:
    """Every world user's candidates and the rankers' lists of them.

    Attributes:
        click: ``[users, candidates]`` the world's click probability of each candidate.
        gain: ``[users, candidates]`` ``p(click) + p(conversion)`` (the manifest's gain).
        top: ranker -> ``[users, SLOTS]`` candidate columns of its list, best first.
        scores: ranker -> ``[users, candidates]`` its scores.
        activity: ``[users]`` the world's hidden activity level.
    """

    click: F32
    gain: F32
    top: dict[str, I64]
    scores: dict[str, F32]
    activity: F64


@dataclass(frozen=True)
class Pair:
    """Two rankers as the simulation uses them.

    Attributes:
        name: ``A:B``.
        list_click: ``[2, users, SLOTS]`` click probability when examined, of each arm's
            list at each position (A then B).
        merged_click: ``[users, COINS, SLOTS]`` the same for the team draft of each coin
            sequence; ``merged_team`` says whose pick each slot is (``TEAM_A`` or B).
        ndcg: NDCG@10 of A and B (click gain), and with the manifest's gain.
        direction: +1 when A's expected clicks are higher, -1 when lower, 0 for an A/A.
    """

    name: str
    list_click: F64
    merged_click: F64
    merged_team: npt.NDArray[np.int8]
    ndcg: dict[str, float]
    direction: int


def build_lists(artifact_set: ArtifactSet, world: World, candidates: int) -> Lists:
    """Candidates and lists of every world user (see the module docstring)."""
    user_x = np.load(artifact_set.file("user_features")).astype(np.float32)
    item_x = np.load(artifact_set.file("item_features")).astype(np.float32)
    item_emb = np.load(artifact_set.file("item_embeddings")).astype(np.float32)
    tower = ort.InferenceSession(
        str(artifact_set.file("user_tower")), providers=["CPUExecutionProvider"]
    )
    (user_emb,) = tower.run(None, {"user_features": user_x})
    with np.load(artifact_set.file("user_history")) as history:
        indptr = np.asarray(history["indptr"], dtype=np.int64)
        seen_items = np.asarray(history["items"], dtype=np.int64)
    n_users = user_x.shape[0]
    chosen = np.empty((n_users, candidates), dtype=np.int64)
    for start in range(0, n_users, 256):
        rows = np.arange(start, min(start + 256, n_users))
        similarity = user_emb[rows] @ item_emb.T
        for r, user in enumerate(rows):
            similarity[r, seen_items[indptr[user] : indptr[user + 1]]] = -np.inf
        top = np.argpartition(-similarity, candidates, axis=1)[:, :candidates]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1)
        chosen[rows] = np.take_along_axis(top, order, axis=1)
    users = np.repeat(np.arange(n_users), candidates)
    items = chosen.ravel()
    truth = world.truth.pair_scores(users, items)
    ranker = ort.InferenceSession(
        str(artifact_set.file("ranker")), providers=["CPUExecutionProvider"]
    )
    heads = [str(h) for h in artifact_set.config["ranker_heads"]]
    weighting = artifact_set.config.get("ranker_head_weights", {})
    weights = np.array([float(weighting.get(h, 1.0)) for h in heads], dtype=np.float32)
    heads_out = np.concatenate(
        [
            ranker.run(
                ["scores"],
                {
                    "user_features": user_x[users[s : s + 65536]],
                    "item_features": item_x[items[s : s + 65536]],
                },
            )[0]
            for s in range(0, items.size, 65536)
        ]
    )
    heavy = heads_out @ weights
    heavy_click = heads_out[:, heads.index("click")]
    prerank = prerank_pair_scores(
        load_prerank(artifact_set.file("prerank")), user_x[users], item_x[items]
    )
    shape = (n_users, candidates)
    scores = {
        "heavy": heavy.reshape(shape).astype(np.float32),
        "heavy_click": heavy_click.reshape(shape).astype(np.float32),
        "prerank": prerank.reshape(shape),
        "retrieval": -np.tile(np.arange(candidates, dtype=np.float32), (n_users, 1)),
    }
    return Lists(
        click=truth.click.reshape(shape),
        gain=truth.expected_gain.reshape(shape),
        top={name: np.argsort(-s, axis=1, kind="stable")[:, :SLOTS] for name, s in scores.items()},
        scores=scores,
        activity=np.asarray(world.truth.user_activity, dtype=np.float64),
    )


def build_pair(lists: Lists, a: str, b: str) -> Pair:
    """The click probabilities of A's and B's lists and of their team drafts under every
    coin sequence, for every user."""
    n_users = lists.click.shape[0]
    rows = np.arange(n_users)[:, None]
    list_click = np.stack(
        [lists.click[rows, lists.top[a]], lists.click[rows, lists.top[b]]]
    ).astype(np.float64)
    merged_click = np.empty((n_users, COINS, SLOTS))
    merged_team = np.empty((n_users, COINS, SLOTS), dtype=np.int8)
    sequences = [[bool(c >> k & 1) for k in range(ROUNDS)] for c in range(COINS)]
    for user in range(n_users):
        top_a, top_b = lists.top[a][user].tolist(), lists.top[b][user].tolist()
        for c, coins in enumerate(sequences):
            merged = team_draft(top_a, top_b, SLOTS, coins)
            merged_click[user, c] = lists.click[user, list(merged.items)]
            merged_team[user, c] = merged.teams
    ndcg = {}
    for name in (a, b):
        ndcg[f"{name}.click"] = ndcg_at_k(lists.scores[name], lists.click, SLOTS)[0]
        ndcg[f"{name}.gain"] = ndcg_at_k(lists.scores[name], lists.gain, SLOTS)[0]
    expected = (list_click * EXAMINATION).sum(axis=2).mean(axis=1)
    direction = 0 if a == b else (1 if expected[0] > expected[1] else -1)
    return Pair(f"{a}:{b}", list_click, merged_click, merged_team, ndcg, direction)


def _requests(rng: np.random.Generator, activity: F64, users: I64, mean: float) -> I64:
    return 1 + rng.poisson(np.maximum(0.0, mean * activity[users] - 1.0))


def interleaving_run(
    pair: Pair, activity: F64, rng: np.random.Generator, n: int, mean_requests: float
) -> tuple[float, float, int]:
    """One interleaving experiment of ``n`` users: the signed sign-test p-values on requests
    and on users (positive p when A won more, negative when B did) and the clicked
    requests."""
    users = rng.integers(0, activity.size, size=n)
    requests = _requests(rng, activity, users, mean_requests)
    slot = np.repeat(np.arange(n), requests)
    coin = rng.integers(0, COINS, size=slot.size)
    q = pair.merged_click[users[slot], coin] * EXAMINATION
    clicked = rng.random(q.shape) < q
    team_a = pair.merged_team[users[slot], coin] == TEAM_A
    clicks_a = (clicked & team_a).sum(axis=1)
    clicks_b = (clicked & ~team_a).sum(axis=1)
    outcome = np.sign(clicks_a - clicks_b)
    wins_a, wins_b = int((outcome > 0).sum()), int((outcome < 0).sum())
    net = np.bincount(slot, weights=outcome, minlength=n)
    users_a, users_b = int((net > 0).sum()), int((net < 0).sum())
    return (
        math.copysign(sign_test(wins_a, wins_b), wins_a - wins_b),
        math.copysign(sign_test(users_a, users_b), users_a - users_b),
        int(((clicks_a + clicks_b) > 0).sum()),
    )


def ab_run(
    pair: Pair, activity: F64, rng: np.random.Generator, n: int, mean_requests: float
) -> float:
    """One A/B experiment of ``n`` users (half per arm): the signed delta-method p-value of
    A's CTR against B's (positive when A's is higher)."""
    half = max(2, n // 2)
    arms = []
    for arm in (0, 1):
        users = rng.integers(0, activity.size, size=half)
        requests = _requests(rng, activity, users, mean_requests)
        q = pair.list_click[arm, users] * EXAMINATION
        clicks = rng.binomial(requests[:, None], q).sum(axis=1)
        arms.append((clicks, requests * SLOTS))
    (clicks_a, shown_a), (clicks_b, shown_b) = arms
    try:
        result = compare_ratio(clicks_b, shown_b, clicks_a, shown_a)
    except ValueError:
        return 1.0
    return math.copysign(result.p_value, result.absolute_lift)


def detected(signed_p: F64, direction: int, alpha: float) -> npt.NDArray[np.bool_]:
    """Whether each signed p-value is a detection: ``p < alpha`` in the expected direction
    (either direction for an A/A)."""
    hit = np.abs(signed_p) < alpha
    if direction:
        hit &= np.sign(signed_p) == direction
    return hit


def users_for_power(sizes: Sequence[int], rates: Sequence[float | None]) -> float | None:
    """The users at which the detection rate reaches :data:`POWER`, interpolated linearly
    in log users between the two sizes around it; None when no size reaches it."""
    known = [(n, r) for n, r in zip(sizes, rates, strict=True) if r is not None]
    for (n0, r0), (n1, r1) in itertools.pairwise(known):
        if r0 < POWER <= r1:
            share = (POWER - r0) / (r1 - r0)
            return math.exp(math.log(n0) + share * (math.log(n1) - math.log(n0)))
    if known and known[0][1] >= POWER:
        return float(known[0][0])
    return None


def _cell(rate: float | None, runs: int) -> str:
    if rate is None:
        return "—"
    low, high = proportion_confint(round(rate * runs), runs, method="wilson")
    return f"{rate:.3f} [{low:.2f}, {high:.2f}]"


def _users_cell(value: float | None, sizes: Sequence[int]) -> str:
    return f"≈ {value:,.0f}" if value is not None else f"> {sizes[-1]:,}"


def run_pair(
    pair: Pair, activity: F64, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, object]:
    """Detection rates of every method at every size for ``pair``."""
    methods = ("interleaving_requests", "interleaving_users", "ab_delta")
    rates: dict[str, list[float | None]] = {m: [] for m in methods}
    clicked: list[float | None] = []
    for n in args.sizes:
        saturated = {
            m: sum(1 for r in rates[m] if r is not None and r >= SKIP_AT) >= 2 for m in methods
        }
        started = time.perf_counter()
        if saturated["interleaving_requests"] and saturated["interleaving_users"]:
            rates["interleaving_requests"].append(None)
            rates["interleaving_users"].append(None)
            clicked.append(None)
        else:
            runs = [
                interleaving_run(pair, activity, rng, n, args.requests_per_user)
                for _ in range(args.runs)
            ]
            p = np.array(runs)
            for column, method in enumerate(("interleaving_requests", "interleaving_users")):
                rates[method].append(
                    float(detected(p[:, column], pair.direction, args.alpha).mean())
                )
            clicked.append(float(p[:, 2].mean()))
        if saturated["ab_delta"]:
            rates["ab_delta"].append(None)
        else:
            signed = np.array(
                [ab_run(pair, activity, rng, n, args.requests_per_user) for _ in range(args.runs)]
            )
            rates["ab_delta"].append(float(detected(signed, pair.direction, args.alpha).mean()))
        print(
            f"{pair.name} n={n}: "
            + ", ".join(f"{m} {rates[m][-1]}" for m in methods)
            + f" ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
    return {
        "pair": pair.name,
        "ndcg": pair.ndcg,
        "direction": pair.direction,
        "sizes": list(args.sizes),
        "rates": rates,
        "clicked_requests": clicked,
        "users_for_80": {m: users_for_power(args.sizes, rates[m]) for m in methods},
    }


def render(results: list[dict[str, object]], args: argparse.Namespace) -> list[str]:
    """The tables of the block: NDCG of each pair and users for 80 % power, then the
    detection rate against users for each pair."""
    lines = [
        f"NDCG@10 over each user's {args.candidates} candidates with the world's click "
        "probability as the gain (in brackets: with p(click) + p(conversion), the manifest's "
        f"gain), and the users an experiment needs to detect A's difference from B in "
        f"{POWER:.0%} of runs at alpha {args.alpha} (interpolated between sizes; for the "
        "A/A pair, the false-positive rate is in the table below):",
        "",
    ]
    rows = []
    for result in results:
        a, b = str(result["pair"]).split(":")
        ndcg = result["ndcg"]
        assert isinstance(ndcg, dict)
        needed = result["users_for_80"]
        assert isinstance(needed, dict)
        rows.append(
            [
                f"{a} vs {b}",
                f"{ndcg[a + '.click']:.3f} ({ndcg[a + '.gain']:.3f})",
                f"{ndcg[b + '.click']:.3f} ({ndcg[b + '.gain']:.3f})",
                f"{ndcg[a + '.click'] - ndcg[b + '.click']:+.3f}",
                *(
                    "—" if a == b else _users_cell(needed[m], args.sizes)
                    for m in ("interleaving_requests", "interleaving_users", "ab_delta")
                ),
            ]
        )
    lines += table(
        [
            "A vs B",
            "NDCG@10 A",
            "NDCG@10 B",
            "difference",
            "interleaving, sign test on requests",
            "interleaving, sign test on users",
            "A/B on CTR, delta method",
        ],
        "lrrrrrr",
        rows,
    )
    for result in results:
        rates = result["rates"]
        assert isinstance(rates, dict)
        clicked = result["clicked_requests"]
        assert isinstance(clicked, list)
        lines += [
            "",
            f"Detection rate of **{str(result['pair']).replace(':', ' vs ')}** against users "
            f"(share of {args.runs} experiments with p < {args.alpha} in the right direction; "
            "95 % Wilson interval; — not run, already ≥ 99.5 % at two smaller sizes):",
            "",
        ]
        lines += table(
            [
                "users",
                "interleaving: requests",
                "interleaving: users",
                "A/B: delta method",
                "clicked requests (mean)",
            ],
            "rrrrr",
            [
                [
                    f"{n:,}",
                    _cell(rates["interleaving_requests"][i], args.runs),
                    _cell(rates["interleaving_users"][i], args.runs),
                    _cell(rates["ab_delta"][i], args.runs),
                    "—" if clicked[i] is None else f"{clicked[i]:,.0f}",
                ]
                for i, n in enumerate(args.sizes)
            ],
        )
    return lines


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.interleaving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=PROJECT_ROOT / "artifacts",
        help="artifact root (its current set) or a set's directory",
    )
    parser.add_argument(
        "--pairs",
        default="heavy:prerank,heavy_click:prerank,heavy:retrieval,heavy:heavy",
        help=f"comma-separated A:B pairs of {', '.join(RANKERS)}",
    )
    parser.add_argument(
        "--sizes",
        default="25,50,100,200,400,800,1600,3200,6400,12800,25600",
        help="users per experiment (both arms together for A/B)",
    )
    parser.add_argument("--runs", type=int, default=400, help="experiments per size")
    parser.add_argument("--requests-per-user", type=float, default=3.0)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "experiments.md")
    parser.add_argument(
        "--json", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "interleaving.json"
    )
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    args.pairs = [tuple(p.split(":")) for p in str(args.pairs).split(",")]
    for pair in args.pairs:
        if len(pair) != 2 or not set(pair) <= set(RANKERS):
            parser.error(f"--pairs: {':'.join(pair)} is not A:B of {', '.join(RANKERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parse(args_list)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.perf_counter()
    root = args.artifacts
    path = resolve_current(root) if (root / "current").exists() else root
    artifact_set = load_artifact_set(path, verify=False)
    config = WorldConfig(**artifact_set.config["world"])
    world = generate_world(config)
    lists = build_lists(artifact_set, world, args.candidates)
    print(f"lists built in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    results = []
    for a, b in args.pairs:
        results.append(run_pair(build_pair(lists, a, b), lists.activity, args, rng))
    box = machine()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines = [
        "```",
        command_line("loadtest.interleaving", args_list),
        "```",
        "",
        f"- date: {started}; the run took {time.perf_counter() - began:.0f} s",
        f"- machine: {box['cpu']}, {box['memory']} RAM, {box['os']}; load average {load} at "
        "the end (the machine is shared)",
        f"- software: Python {box['python']}, numpy {np.__version__}, scipy {scipy.__version__}; "
        f"commit {box['commit']}",
        f"- artifact set {artifact_set.version}; world: {config.n_users} users, "
        f"{config.n_items} items, seed {config.seed}; {args.requests_per_user:g} requests per "
        f"user on average, {SLOTS} items per request, examination 1/log2(position + 2)",
        "",
        *render(results, args),
    ]
    write_block(args.out, BLOCK, lines)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": command_line("loadtest.interleaving", args_list),
                "date": started,
                "artifact_set": artifact_set.version,
                "runs": args.runs,
                "alpha": args.alpha,
                "requests_per_user": args.requests_per_user,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
