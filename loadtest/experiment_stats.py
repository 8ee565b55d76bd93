"""``python -m loadtest.experiment_stats``: the statistics of experiment reports
(:mod:`core.experiments.stats`) validated by simulation on the synthetic world
(:mod:`training.experiment_world`), at a larger scale than the tests, and timed at the scale
of a report over 1M events.

* **A/A**: ``--aa-runs`` experiments of ``--aa-users`` users per arm, both arms without
  lift: the share of p-values below 0.05 (without and with CUPED, whose covariate is the
  user's pre-experiment CTR), a Kolmogorov-Smirnov test of the p-values against the uniform,
  the mean CUPED variance reduction, and how often the control's 95 % interval covers the
  true CTR: the delta method's, and a per-impression binomial one that ignores clustering.
* **Power**: ``--power-runs`` experiments for each relative lift of ``--lifts`` and each
  size of ``--sizes`` (users per arm): the share detected at 0.05 against
  :func:`~core.experiments.stats.analytic_power` with the per-user variance measured on one
  arm of 200,000 users (with CUPED: the adjusted per-user variance).
* **SRM**: ``--srm-runs`` splits of each total of ``--srm-users`` users for each actual
  control share ``0.5 + e``, ``e`` in ``--imbalances``, tested against the configured
  50/50: how often :func:`~core.experiments.stats.sample_ratio` flags a mismatch.
* **Timing**: ``compare_ratio`` with CUPED and ``sample_ratio`` on ``--timing-users`` users
  with 5 impressions each on average (1M impressions for 200,000 users), the median of
  ``--timing-repeats`` calls.

Rates carry their 95 % Wilson interval (``statsmodels.stats.proportion.proportion_confint``).
The tables are printed and written into ``--out`` (``docs/experiments.md``) between the
markers of the block ``experiment-stats`` (:func:`loadtest.reporting.write_block`); the prose
around them is hand-written.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy
import statsmodels
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from core.experiments.stats import analytic_power, ratio_estimate, sample_ratio
from loadtest.harness import machine
from loadtest.reporting import command_line, table, write_block
from mesh.paths import PROJECT_ROOT
from training.experiment_world import (
    Arms,
    Population,
    compare_arms,
    draw_arms,
    draw_split,
    population,
)
from training.world import WorldConfig, generate_world

ALPHA = 0.05
BLOCK = "experiment-stats"
CELLS = 2_000_000
"""Users (over all runs) drawn per chunk: bounds the memory of one draw to ~100 MB."""
PLANNING_USERS = 200_000
"""Size of the arm the per-user variance of the analytic power is measured on."""
TIMING_IMPRESSIONS = 4.0
"""Mean of the Poisson part of a user's impressions in the timing: 1 + 4 = 5 on average."""


@dataclass(frozen=True)
class Rate:
    """``hits`` out of ``runs``, shown with its 95 % Wilson interval."""

    hits: int
    runs: int

    @property
    def value(self) -> float:
        return self.hits / self.runs

    def __str__(self) -> str:
        low, high = proportion_confint(self.hits, self.runs, alpha=ALPHA, method="wilson")
        return f"{self.value:.3f} [{low:.3f}, {high:.3f}]"


def rate(flags: Sequence[bool] | npt.NDArray[np.bool_]) -> Rate:
    """The share of true ``flags``."""
    array = np.asarray(flags, dtype=bool)
    return Rate(int(array.sum()), int(array.size))


def chunks(runs: int, users: int) -> Iterator[int]:
    """Run counts that add up to ``runs``, each drawing at most :data:`CELLS` users per arm."""
    step = max(1, CELLS // users)
    for start in range(0, runs, step):
        yield min(step, runs - start)


def compare_run(control: Arms, treatment: Arms, run: int, cuped: bool) -> tuple[float, float]:
    """The p-value and the variance reduction of run ``run`` of two arms."""
    result = compare_arms(control, treatment, run, cuped, ALPHA)
    return result.p_value, result.variance_reduction


def aa_section(people: Population, rng: np.random.Generator, runs: int, users: int) -> list[str]:
    plain: list[float] = []
    cuped: list[float] = []
    reduction: list[float] = []
    delta: list[bool] = []
    naive: list[bool] = []
    truth, z = people.true_ctr, float(sps.norm.ppf(1 - ALPHA / 2))
    for size in chunks(runs, users):
        control, twin = draw_arms(people, rng, size, users), draw_arms(people, rng, size, users)
        for run in range(size):
            plain.append(compare_run(control, twin, run, cuped=False)[0])
            p_value, gain = compare_run(control, twin, run, cuped=True)
            cuped.append(p_value)
            reduction.append(gain)
            estimate = ratio_estimate(control.clicks[run], control.impressions[run])
            delta.append(abs(estimate.mean - truth) <= z * math.sqrt(estimate.variance))
        low, high = proportion_confint(
            control.clicks.sum(axis=1),
            control.impressions.sum(axis=1),
            alpha=ALPHA,
            method="normal",
        )
        naive.extend(((low <= truth) & (truth <= high)).tolist())
    uniform = sps.kstest(plain, "uniform").pvalue
    uniform_cuped = sps.kstest(cuped, "uniform").pvalue
    return [
        "#### A/A experiments",
        "",
        f"{runs} experiments of {users} users per arm, no lift; true CTR {truth:.4f}.",
        "",
        *table(
            ["figure", "value", "bar"],
            "lrl",
            [
                ["false-positive rate at 0.05", rate(np.array(plain) < ALPHA), "[0.03, 0.07]"],
                [
                    "false-positive rate at 0.05, CUPED",
                    rate(np.array(cuped) < ALPHA),
                    "[0.03, 0.07]",
                ],
                ["KS test of the p-values against uniform: p", f"{uniform:.3f}", "not small"],
                ["the same, CUPED: p", f"{uniform_cuped:.3f}", "not small"],
                ["mean CUPED variance reduction", f"{np.mean(reduction):.3f}", "> 0"],
                ["95 % delta-method CI covers the true CTR", rate(delta), "~0.95"],
                ["95 % per-impression (i.i.d.) CI covers it", rate(naive), "(under-covers)"],
            ],
        ),
    ]


def power_section(
    people: Population,
    rng: np.random.Generator,
    runs: int,
    lifts: Sequence[float],
    sizes: Sequence[int],
) -> list[str]:
    planning = draw_arms(people, rng, 1, PLANNING_USERS)
    variance = ratio_estimate(planning.clicks[0], planning.impressions[0]).user_variance
    adjusted = ratio_estimate(
        planning.clicks[0], planning.impressions[0], planning.pre_ctr[0]
    ).user_variance
    rows: list[list[object]] = []
    worst = 0.0
    for users in sizes:
        for lift in lifts:
            plain: list[bool] = []
            cuped: list[bool] = []
            for size in chunks(runs, users):
                control = draw_arms(people, rng, size, users)
                treated = draw_arms(people, rng, size, users, lift=lift)
                for run in range(size):
                    plain.append(compare_run(control, treated, run, cuped=False)[0] < ALPHA)
                    cuped.append(compare_run(control, treated, run, cuped=True)[0] < ALPHA)
            absolute = lift * people.true_ctr
            expected = analytic_power(absolute, users, variance, ALPHA)
            expected_cuped = analytic_power(absolute, users, adjusted, ALPHA)
            observed, observed_cuped = rate(plain), rate(cuped)
            worst = max(
                worst, abs(observed.value - expected), abs(observed_cuped.value - expected_cuped)
            )
            rows.append(
                [
                    users,
                    f"{lift:.1%}",
                    f"{absolute:.5f}",
                    f"{expected:.3f}",
                    observed,
                    f"{expected_cuped:.3f}",
                    observed_cuped,
                ]
            )
    return [
        "#### Power",
        "",
        f"{runs} experiments per cell, test at 0.05. Per-user variance of the linearised CTR, "
        f"measured on one arm of {PLANNING_USERS} users: {variance:.5f} (CUPED: {adjusted:.5f}). "
        f"Largest gap between simulated and analytic power: {worst * 100:.1f} points (bar: 5).",
        "",
        *table(
            [
                "users per arm",
                "relative lift",
                "absolute lift",
                "analytic power",
                "simulated power",
                "analytic, CUPED",
                "simulated, CUPED",
            ],
            "rrrrrrr",
            rows,
        ),
    ]


def srm_section(
    rng: np.random.Generator, runs: int, imbalances: Sequence[float], totals: Sequence[int]
) -> list[str]:
    rows: list[list[object]] = []
    for imbalance in imbalances:
        share = 0.5 + imbalance
        cells: list[object] = [f"{share:.2%} / {1 - share:.2%}"]
        for users in totals:
            splits = draw_split(rng, users, [share, 1 - share], runs)
            cells.append(rate([sample_ratio(row.tolist(), [0.5, 0.5]).mismatch for row in splits]))
        rows.append(cells)
    return [
        "#### Sample-ratio mismatch",
        "",
        f"Share of {runs} splits flagged (p < 0.001) against the configured 50 / 50, by the actual "
        "split and the users in the experiment. Bars: a 51 / 49 split of 100,000 users flagged "
        "in at least 90 % of runs, a fair one in at most 1 %.",
        "",
        *table(
            ["actual split", *(f"{users:,} users" for users in totals)],
            "l" + "r" * len(totals),
            rows,
        ),
    ]


def timing_section(
    people: Population, rng: np.random.Generator, users: int, repeats: int
) -> list[str]:
    control = draw_arms(people, rng, 1, users // 2)
    treated = draw_arms(people, rng, 1, users - users // 2)
    impressions = int(control.impressions.sum() + treated.impressions.sum())
    clicks = int(control.clicks.sum() + treated.clicks.sum())

    def compare_ms(cuped: bool) -> float:
        durations = []
        for _ in range(repeats):
            started = time.perf_counter()
            compare_run(control, treated, 0, cuped)
            sample_ratio([users // 2, users - users // 2], [0.5, 0.5])
            durations.append(time.perf_counter() - started)
        return statistics.median(durations) * 1000

    return [
        "#### Time of a report's statistics",
        "",
        f"{users:,} users, {impressions:,} impressions and {clicks:,} clicks, given as per-user "
        f"sums; median of {repeats} calls.",
        "",
        *table(
            ["call", "ms"],
            "lr",
            [
                ["`compare_ratio` (CTR) + `sample_ratio`", f"{compare_ms(False):.1f}"],
                ["`compare_ratio` with CUPED + `sample_ratio`", f"{compare_ms(True):.1f}"],
            ],
        ),
    ]


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers."""
    return [float(part) for part in text.split(",")]


def ints(text: str) -> list[int]:
    """A comma-separated list of integers."""
    return [int(part) for part in text.split(",")]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.experiment_stats", description=__doc__
    )
    parser.add_argument("--seed", type=int, default=0, help="world and simulation seed")
    parser.add_argument("--world-users", type=int, default=WorldConfig.n_users)
    parser.add_argument("--world-items", type=int, default=WorldConfig.n_items)
    parser.add_argument("--aa-runs", type=int, default=2000)
    parser.add_argument("--aa-users", type=int, default=5000, help="users per arm")
    parser.add_argument("--power-runs", type=int, default=2000)
    parser.add_argument("--lifts", type=floats, default=[0.005, 0.01, 0.02, 0.04])
    parser.add_argument("--sizes", type=ints, default=[1000, 5000, 20000])
    parser.add_argument("--srm-runs", type=int, default=2000)
    parser.add_argument("--imbalances", type=floats, default=[0.0, 0.0025, 0.005, 0.01, 0.02])
    parser.add_argument("--srm-users", type=ints, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--timing-users", type=int, default=200_000)
    parser.add_argument("--timing-repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "experiments.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parse(args_list)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.perf_counter()
    config = WorldConfig(n_users=args.world_users, n_items=args.world_items, seed=args.seed)
    world = generate_world(config)
    people = population(world)
    rng = np.random.default_rng(args.seed)
    sections = [
        aa_section(people, rng, args.aa_runs, args.aa_users),
        power_section(people, rng, args.power_runs, args.lifts, args.sizes),
        srm_section(rng, args.srm_runs, args.imbalances, args.srm_users),
        timing_section(
            population(world, TIMING_IMPRESSIONS), rng, args.timing_users, args.timing_repeats
        ),
    ]
    box = machine()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines = [
        "```",
        command_line("loadtest.experiment_stats", args_list),
        "```",
        "",
        f"- date: {started}; the run took {time.perf_counter() - began:.0f} s",
        f"- machine: {box['cpu']}, {box['memory']} RAM, {box['os']}; load average {load} at "
        "the end (the machine is shared)",
        f"- software: Python {box['python']}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"statsmodels {statsmodels.__version__}; commit {box['commit']}",
        f"- world: {config.n_users} users, {config.n_items} items, "
        f"{config.impressions_per_user} impressions per user on average, seed {config.seed}",
    ]
    for section in sections:
        lines += ["", *section]
    write_block(args.out, BLOCK, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
