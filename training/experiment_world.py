"""Randomised experiments simulated on the synthetic world, where the truth is known: what
validates the statistics of experiment reports (:mod:`core.experiments.stats`), in
``tests/core/experiments/test_stats.py`` and :mod:`loadtest.experiment_stats`.

The population (:func:`population`) is the world's users, each with:

* an impression rate ``lambda_u = impressions_per_user * activity_u`` (the world's hidden
  activity level, mean 1): in an experiment the user sees ``1 + Poisson(lambda_u)``
  impressions (a user in a report was exposed, so saw at least one);
* a click propensity ``p_u``: the mean ground-truth click probability of the impressions
  the world logged for the user (its train part), so users differ (around 0.3 with a
  standard deviation near 0.08 in the default world);
* a pre-experiment CTR: the user's click share in the world's train log, i.e. the as-of
  CTR before the experiment started, the CUPED covariate.

An arm (:func:`draw_arms`) samples users uniformly with replacement from the population, and
a user's impressions are each clicked with probability ``p_u * (1 + lift)``: clicks are
``Binomial(impressions, p_u * (1 + lift))``. A user's impressions share one propensity,
so they are clustered by user. The arm's true CTR (clicks per impression in an infinite
arm) is :attr:`Population.true_ctr` times ``1 + lift``.

Draws are vectorised over the runs (rows) of an experiment, one ``numpy.random.Generator``
driving each call; :func:`compare_arms` reads one run as a report would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.experiments.stats import Comparison, compare_ratio
from training.world import World

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Population:
    """The users arms are drawn from, one entry per world user (see the module docstring)."""

    impression_rate: F64
    propensity: F64
    pre_ctr: F64

    @property
    def true_ctr(self) -> float:
        """Clicks per impression of an infinite arm without lift:
        ``sum_u p_u (1 + lambda_u) / sum_u (1 + lambda_u)``."""
        impressions = 1.0 + self.impression_rate
        return float(self.propensity @ impressions / impressions.sum())


@dataclass(frozen=True)
class Arms:
    """``runs`` independent arms of ``users`` users each, as ``[runs, users]`` arrays of
    the per-user sums a report reads (clicks, impressions) and the covariate."""

    clicks: I64
    impressions: I64
    pre_ctr: F64


def population(world: World, impressions_per_user: float | None = None) -> Population:
    """The world's users as an experiment population, propensities and pre-experiment CTRs
    from the world's train log; ``impressions_per_user`` replaces the world's own as the
    mean of the Poisson part of a user's impressions (a user of average activity)."""
    logs = world.train
    n_users = world.config.n_users
    probability = world.truth.pair_scores(logs.users, logs.items).click.astype(np.float64)
    shown = np.bincount(logs.users, minlength=n_users)
    clicked = np.bincount(logs.users, weights=logs.clicked, minlength=n_users)
    mean = (
        world.config.impressions_per_user if impressions_per_user is None else impressions_per_user
    )
    return Population(
        impression_rate=mean * world.truth.user_activity,
        propensity=np.bincount(logs.users, weights=probability, minlength=n_users) / shown,
        pre_ctr=clicked / shown,
    )


def draw_arms(
    people: Population, rng: np.random.Generator, runs: int, users: int, lift: float = 0.0
) -> Arms:
    """``runs`` arms of ``users`` users each, with clicks ``p_u * (1 + lift)`` likely.

    Raises:
        ValueError: ``lift`` would push a propensity above 1.
    """
    if float(people.propensity.max()) * (1.0 + lift) > 1.0:
        raise ValueError(f"lift: {lift} makes a click probability exceed 1")
    rows = rng.integers(0, people.propensity.size, size=(runs, users))
    impressions = 1 + rng.poisson(people.impression_rate[rows])
    clicks = rng.binomial(impressions, people.propensity[rows] * (1.0 + lift))
    return Arms(
        clicks=clicks.astype(np.int64),
        impressions=impressions.astype(np.int64),
        pre_ctr=people.pre_ctr[rows],
    )


def compare_arms(
    control: Arms, treatment: Arms, run: int, cuped: bool = False, alpha: float = 0.05
) -> Comparison:
    """:func:`~core.experiments.stats.compare_ratio` of run ``run`` of two arms, CTR as clicks
    per impression, with the pre-experiment CTR as the CUPED covariate when ``cuped``."""
    cov_c, cov_t = (control.pre_ctr[run], treatment.pre_ctr[run]) if cuped else (None, None)
    return compare_ratio(
        control.clicks[run],
        control.impressions[run],
        treatment.clicks[run],
        treatment.impressions[run],
        cov_c,
        cov_t,
        alpha=alpha,
    )


def draw_split(rng: np.random.Generator, users: int, shares: Sequence[float], runs: int) -> I64:
    """Users per variant of ``runs`` experiments of ``users`` users each, every user landing
    in a variant with probability ``shares`` (the actual split, which may differ from the
    configured weights): a ``[runs, variants]`` multinomial draw."""
    return np.asarray(rng.multinomial(users, shares, size=runs), dtype=np.int64)
