"""The statistics of experiment reports: cases computed by hand, then the behaviour a reader
of a report relies on, checked by simulating experiments on the synthetic world
(:mod:`training.experiment_world`): false positives at the nominal rate, the power the
analytic formula promises, CUPED narrowing intervals without bias, delta-method intervals
that cover the truth where a per-impression interval does not, SRM caught when it exists.

The simulations are seeded (deterministic) and sized so that a correct implementation lies
at least about three standard errors of the simulation inside each bound."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from core.experiments.stats import (
    Comparison,
    Estimate,
    analytic_power,
    compare,
    compare_ratio,
    coverage,
    gini,
    ratio_estimate,
    sample_ratio,
)
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
RUNS = 2000
USERS = 1000
"""Users per arm of each simulated experiment."""
LIFT = 0.05
"""Relative lift of the treatment in the power and CUPED simulations (analytic power ~0.8)."""
Z = float(sps.norm.ppf(1 - ALPHA / 2))


# --- by hand -----------------------------------------------------------------------------


def test_ratio_estimate_is_the_ratio_of_sums_with_the_users_delta_variance() -> None:
    # R = 3/8; mean denominator 8/3; l = (x - R y) / (8/3) = (0.09375, -0.28125, 0.1875);
    # var(l) = 0.123046875 / 2; variance = var(l) / 3.
    estimate = ratio_estimate([1, 0, 2], [2, 2, 4])

    assert estimate.mean == pytest.approx(0.375)
    assert estimate.variance == pytest.approx(0.0205078125)
    assert estimate.users == 3
    assert estimate.user_variance == pytest.approx(3 * 0.0205078125)


def test_one_impression_per_user_gives_the_variance_of_a_plain_mean() -> None:
    # Clicks (1, 0, 0, 1): mean 1/2, sample variance 1/3, variance of the mean 1/12.
    estimate = ratio_estimate([1, 0, 0, 1], [1, 1, 1, 1])

    assert estimate.mean == pytest.approx(0.5)
    assert estimate.variance == pytest.approx(1 / 12)


def test_lift_interval_is_symmetric_around_the_difference_with_hand_computed_figures() -> None:
    # d = 0.02, s = sqrt(2e-4) so d / s = sqrt(2); relative: 0.2 with variance
    # 1e-4 / 0.01 + 0.12^2 * 1e-4 / 0.1^4 = 0.0244.
    control, treatment = Estimate(0.10, 1e-4, 1000), Estimate(0.12, 1e-4, 1000)
    result = compare(control, treatment)

    half = Z * math.sqrt(2e-4)
    assert result.absolute_lift == pytest.approx(0.02)
    assert result.absolute_ci == pytest.approx((0.02 - half, 0.02 + half))
    assert result.absolute_ci[1] - result.absolute_lift == pytest.approx(
        result.absolute_lift - result.absolute_ci[0]
    )
    assert result.relative_lift == pytest.approx(0.2)
    rel_half = Z * math.sqrt(0.0244)
    assert result.relative_ci == pytest.approx((0.2 - rel_half, 0.2 + rel_half))
    assert result.p_value == pytest.approx(0.157299, abs=1e-6)  # 2 P(Z > sqrt 2)
    assert result.probability_to_beat == pytest.approx(0.921350, abs=1e-6)  # P(Z < sqrt 2)
    assert result.probability_to_beat == pytest.approx(1 - result.p_value / 2)
    assert result.variance_reduction == 0.0
    assert (result.control_mean, result.treatment_mean) == pytest.approx((0.10, 0.12))


def test_expected_loss_is_the_posterior_mean_shortfall_of_the_treatment() -> None:
    control, treatment = Estimate(0.10, 1e-4, 1000), Estimate(0.12, 1e-4, 1000)
    scale = math.sqrt(2e-4)

    shortfall = sps.norm.expect(lambda d: max(0.0, -d), loc=0.02, scale=scale)
    result = compare(control, treatment)
    assert result.expected_loss == pytest.approx(shortfall, rel=1e-6)
    # Swapped, the control is the better arm: the loss is the lift plus that shortfall.
    swapped = compare(treatment, control)
    assert swapped.expected_loss == pytest.approx(shortfall + 0.02, rel=1e-6)
    assert swapped.probability_to_beat == pytest.approx(1 - 0.921350, abs=1e-6)
    low, high = result.absolute_ci
    assert swapped.absolute_ci == pytest.approx((-high, -low))


def test_cuped_with_a_covariate_that_explains_the_metric_removes_its_variance() -> None:
    rng = np.random.default_rng(0)
    before = rng.normal(10.0, 2.0, size=400)
    after = before + rng.normal(0.0, 0.1, size=400)
    ones = np.ones(400)

    result = compare_ratio(
        after[:200], ones[:200], after[200:], ones[200:], before[:200], before[200:]
    )
    plain = compare_ratio(after[:200], ones[:200], after[200:], ones[200:])

    assert result.variance_reduction > 0.99
    # The arms' chance difference in the covariate is taken out of the lift.
    assert abs(result.absolute_lift) < 0.1 * abs(plain.absolute_lift)


def test_a_constant_covariate_changes_nothing() -> None:
    plain = ratio_estimate([1, 0, 2, 5], [2, 2, 4, 6])
    adjusted = ratio_estimate([1, 0, 2, 5], [2, 2, 4, 6], covariate=[0.3, 0.3, 0.3, 0.3])

    assert adjusted.theta == 0.0
    assert (adjusted.mean, adjusted.variance) == pytest.approx((plain.mean, plain.variance))


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="theta"):
        ratio_estimate([1, 2], [3, 4], theta=0.5)
    with pytest.raises(ValueError, match="cov_c, cov_t"):
        compare_ratio([1, 2], [3, 4], [1, 2], [3, 4], cov_c=[0.1, 0.2])
    with pytest.raises(ValueError, match="denominator"):
        ratio_estimate([0, 0], [0, 0])
    with pytest.raises(ValueError, match="nothing to test"):
        compare_ratio([0, 0], [3, 4], [0, 0], [5, 6])


def test_srm_of_an_exact_split_is_no_evidence_at_all() -> None:
    result = sample_ratio([50, 50], [0.5, 0.5])

    assert (result.chi2, result.p_value, result.mismatch) == (0.0, 1.0, False)
    assert result.observed == (50, 50)
    assert sample_ratio([20, 30, 50], [2, 3, 5]).p_value == pytest.approx(1.0)


def test_srm_statistic_computed_by_hand() -> None:
    # (60 - 50)^2 / 50 + (40 - 50)^2 / 50 = 4; chi-square(1) is Z^2: p = 2 P(Z > 2).
    result = sample_ratio([60, 40], [1, 1])

    assert result.expected_share == (0.5, 0.5)
    assert result.chi2 == pytest.approx(4.0)
    assert result.p_value == pytest.approx(0.0455003, abs=1e-7)
    assert not result.mismatch
    assert sample_ratio([60, 40], [1, 1], threshold=0.05).mismatch


def test_srm_of_variants_without_traffic() -> None:
    assert sample_ratio([50, 50, 0], [0.5, 0.5, 0.0]).p_value == pytest.approx(1.0)
    leaked = sample_ratio([50, 50, 1], [0.5, 0.5, 0.0])
    assert (leaked.chi2, leaked.p_value, leaked.mismatch) == (math.inf, 0.0, True)
    assert sample_ratio([0, 0], [0.5, 0.5]).mismatch is False


def test_gini_and_coverage_by_hand() -> None:
    assert gini([4, 4, 4, 4]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 7]) == pytest.approx(1.0)
    # Sorted (1, 3): ((2 - 3) * 1 + (4 - 3) * 3) / ((2 - 1) * 4) = 0.5.
    assert gini([3, 1]) == pytest.approx(0.5)
    assert coverage([0, 3, 0, 1], catalogue_size=10) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        gini([0, 0])


def test_analytic_power_by_hand() -> None:
    # A lift of (z_0.975 + z_0.8) standard errors is detected 80 % of the time (the far
    # tail adds about 1e-7); no lift is "detected" at the level of the test.
    se = math.sqrt(2 / 1000)
    lift = (Z + float(sps.norm.ppf(0.8))) * se

    assert analytic_power(lift, 1000, 1.0) == pytest.approx(0.8, abs=1e-4)
    assert analytic_power(-lift, 1000, 1.0) == pytest.approx(0.8, abs=1e-4)
    assert analytic_power(0.0, 1000, 1.0) == pytest.approx(ALPHA)


# --- by simulation on the synthetic world ------------------------------------------------


@dataclass(frozen=True)
class Simulated:
    people: Population
    control: Arms
    twin: Arms
    """A second arm without lift: control against twin is an A/A experiment."""
    treated: Arms
    """An arm with the relative lift :data:`LIFT`."""

    def compare(self, treatment: Arms, run: int, cuped: bool = False) -> Comparison:
        return compare_arms(self.control, treatment, run, cuped, ALPHA)

    def rejections(self, treatment: Arms, cuped: bool = False) -> float:
        return float(
            np.mean([self.compare(treatment, r, cuped).p_value < ALPHA for r in range(RUNS)])
        )


@pytest.fixture(scope="module")
def simulated() -> Simulated:
    world = generate_world(WorldConfig(n_users=2000, n_items=2000, impressions_per_user=30, seed=1))
    people = population(world)
    rng = np.random.default_rng(14)
    return Simulated(
        people=people,
        control=draw_arms(people, rng, RUNS, USERS),
        twin=draw_arms(people, rng, RUNS, USERS),
        treated=draw_arms(people, rng, RUNS, USERS, lift=LIFT),
    )


def test_users_of_the_world_are_heterogeneous(simulated: Simulated) -> None:
    # The premise of the clustering tests: users differ in propensity and in activity.
    assert np.std(simulated.people.propensity) > 0.05
    assert np.std(simulated.people.impression_rate) > 0.3 * np.mean(
        simulated.people.impression_rate
    )


def test_aa_false_positive_rate_is_nominal(simulated: Simulated) -> None:
    assert 0.03 <= simulated.rejections(simulated.twin) <= 0.07


def test_cuped_aa_false_positive_rate_is_nominal(simulated: Simulated) -> None:
    assert 0.03 <= simulated.rejections(simulated.twin, cuped=True) <= 0.07


def test_power_at_a_known_lift_matches_the_analytic_power(simulated: Simulated) -> None:
    variance = float(
        np.mean(
            [
                ratio_estimate(
                    simulated.control.clicks[r], simulated.control.impressions[r]
                ).user_variance
                for r in range(RUNS)
            ]
        )
    )
    lift = LIFT * simulated.people.true_ctr
    expected = analytic_power(lift, USERS, variance, ALPHA)

    assert 0.6 < expected < 0.95
    assert simulated.rejections(simulated.treated) == pytest.approx(expected, abs=0.05)


def test_cuped_narrows_the_interval_without_bias(simulated: Simulated) -> None:
    true_lift = LIFT * simulated.people.true_ctr
    plain = [simulated.compare(simulated.treated, r) for r in range(RUNS)]
    cuped = [simulated.compare(simulated.treated, r, cuped=True) for r in range(RUNS)]
    lifts = np.array([c.absolute_lift for c in cuped])

    assert np.mean([c.variance_reduction for c in cuped]) > 0.1
    assert np.mean([_width(c) for c in cuped]) < 0.95 * np.mean([_width(c) for c in plain])
    assert abs(lifts.mean() - true_lift) < 3 * lifts.std() / math.sqrt(RUNS)
    covered = np.mean([c.absolute_ci[0] <= true_lift <= c.absolute_ci[1] for c in cuped])
    assert 0.93 <= covered <= 0.97
    assert np.mean([c.p_value < ALPHA for c in cuped]) > np.mean([c.p_value < ALPHA for c in plain])


def _width(result: Comparison) -> float:
    return result.absolute_ci[1] - result.absolute_ci[0]


def test_delta_interval_covers_the_true_ctr_where_a_per_impression_one_does_not(
    simulated: Simulated,
) -> None:
    arms, truth = simulated.control, simulated.people.true_ctr
    estimates = [ratio_estimate(arms.clicks[r], arms.impressions[r]) for r in range(RUNS)]
    delta = np.mean([abs(e.mean - truth) <= Z * math.sqrt(e.variance) for e in estimates])
    low, high = proportion_confint(
        arms.clicks.sum(axis=1), arms.impressions.sum(axis=1), alpha=ALPHA, method="normal"
    )
    naive = np.mean((low <= truth) & (truth <= high))

    assert 0.93 <= delta <= 0.97
    assert naive < 0.88


def test_srm_flags_a_one_point_imbalance_at_100k_users_and_not_a_fair_split() -> None:
    rng = np.random.default_rng(3)
    skewed = draw_split(rng, 100_000, [0.51, 0.49], runs=1000)
    fair = draw_split(rng, 100_000, [0.5, 0.5], runs=3000)

    assert np.mean([sample_ratio(row, [0.5, 0.5]).mismatch for row in skewed]) >= 0.9
    assert np.mean([sample_ratio(row, [0.5, 0.5]).mismatch for row in fair]) <= 0.01
