"""The statistics of experiment reports: pure functions of per-user arrays, no I/O.

* :func:`ratio_estimate`: one variant's ratio metric (clicks per impression, conversions per
  click...) as the ratio of the users' sums, with its delta-method variance, which counts
  the users (not the impressions) as the independent units, and optionally CUPED.
* :func:`compare` / :func:`compare_ratio`: a treatment against the control: absolute and
  relative lift with confidence intervals, the two-sided p-value, and a Bayesian view
  (probability to beat the control, expected loss).
* :func:`sample_ratio`: the sample-ratio-mismatch chi-square test of the users per variant
  against the configured weights.
* :func:`gini` and :func:`coverage`: how impressions spread over the catalogue.
* :func:`analytic_power`: the power of the comparison's test for a true lift.

Distributions and tests come from scipy (``scipy.stats.norm``, ``scipy.stats.chisquare``)
and statsmodels (``statsmodels.stats.power.NormalIndPower``). Each function checks its
arguments and raises ``ValueError`` naming the offending one. ``docs/experiments.md``
("Statistics") states the formulas and how they were validated by simulation
(:mod:`loadtest.experiment_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as sps
from statsmodels.stats.power import NormalIndPower

F64 = npt.NDArray[np.float64]

SRM_THRESHOLD = 0.001
"""p-value under which :func:`sample_ratio` flags a sample-ratio mismatch."""


@dataclass(frozen=True)
class Estimate:
    """One variant's ratio metric over its users.

    Attributes:
        mean: ``sum(numerator) / sum(denominator)`` over the variant's users (e.g. clicks per
            impression, each user's impressions counted together); never CUPED-adjusted.
        variance: the variance of the variant's estimate of that ratio by the delta method
            (see :func:`ratio_estimate`); with a covariate, of the CUPED-adjusted estimate.
        users: the number of users (rows), those with a zero denominator included.
        theta: the CUPED coefficient applied; 0 without a covariate.
        covariate_mean: the users' mean covariate; 0 without a covariate. :func:`compare`
            centres the adjustment on the two variants' pooled covariate mean.
        unadjusted_variance: the delta-method variance without CUPED; ``None`` (an estimate
            made by hand) means the same as ``variance``.
    """

    mean: float
    variance: float
    users: int
    theta: float = 0.0
    covariate_mean: float = 0.0
    unadjusted_variance: float | None = None

    @property
    def user_variance(self) -> float:
        """The variance per user (``variance * users``): what :func:`analytic_power` takes."""
        return self.variance * self.users


@dataclass(frozen=True)
class Comparison:
    """A treatment against the control, for a metric where higher is better.

    Lifts compare the CUPED-adjusted means (the raw ones without a covariate). The Bayesian
    fields use a normal approximation of the posterior of the absolute lift under a flat
    prior: ``N(absolute_lift, variance_c + variance_t)``.

    Attributes:
        absolute_lift: treatment mean minus control mean.
        absolute_ci: its two-sided ``1 - alpha`` confidence interval, symmetric around it.
        relative_lift: ``treatment mean / control mean - 1``.
        relative_ci: its two-sided ``1 - alpha`` confidence interval (delta method on the
            ratio of the two means), symmetric around it.
        p_value: two-sided p-value of the z-test of no difference.
        probability_to_beat: posterior probability that the treatment's mean is above the
            control's (``1 - p_value / 2`` when the lift is positive).
        expected_loss: ``E[max(0, control - treatment)]`` under the posterior, in the
            metric's units: what choosing the treatment costs on average.
        variance_reduction: ``1 - var_adjusted / var_unadjusted`` of the lift's variance
            (CUPED); 0 without a covariate.
        control_mean: the control mean the lifts are computed from.
        treatment_mean: the treatment mean the lifts are computed from.
    """

    absolute_lift: float
    absolute_ci: tuple[float, float]
    relative_lift: float
    relative_ci: tuple[float, float]
    p_value: float
    probability_to_beat: float
    expected_loss: float
    variance_reduction: float
    control_mean: float
    treatment_mean: float


@dataclass(frozen=True)
class SampleRatio:
    """The sample-ratio-mismatch test of one experiment.

    Attributes:
        observed: users per variant, in variant order.
        expected_share: each variant's configured share of users (the weights normalised).
        chi2: Pearson's chi-square statistic of ``observed`` against those shares.
        p_value: its p-value (chi-square with one degree of freedom fewer than the
            variants with a positive weight).
        mismatch: ``p_value`` is below the threshold (0.001 by default): the split is broken.
    """

    observed: tuple[int, ...]
    expected_share: tuple[float, ...]
    chi2: float
    p_value: float
    mismatch: bool


def ratio_estimate(
    numerator: npt.ArrayLike,
    denominator: npt.ArrayLike,
    covariate: npt.ArrayLike | None = None,
    theta: float | None = None,
) -> Estimate:
    """One variant's ratio metric ``R = sum(numerator) / sum(denominator)``, one row per user.

    The variance is the delta method's, with the user as the independent unit: each user's
    linearised value ``l_u = (numerator_u - R * denominator_u) / mean(denominator)`` and
    ``variance = var(l) / users`` (sample variance). Impressions of one user are correlated
    (some users click more), so this is wider than a per-impression binomial variance.

    With a ``covariate`` (the same metric per user before the experiment started, e.g. the
    as-of CTR; any value the treatment cannot have changed), CUPED on the linearised metric:
    ``variance = var(l - theta * c) / users``, where ``theta`` is the given coefficient or,
    when ``None``, the least-squares slope ``cov(l, c) / var(c)`` of this variant alone (0
    when the covariate is constant). :func:`compare` adjusts the mean accordingly;
    :func:`compare_ratio` pools ``theta`` over both variants, which a report should prefer.

    Args:
        numerator: per-user sums of the numerator (e.g. clicks), finite.
        denominator: per-user sums of the denominator (e.g. impressions), finite, same length.
        covariate: per-user pre-experiment values, finite, same length; or ``None``.
        theta: the CUPED coefficient to apply; only with a covariate.

    Returns:
        The variant's :class:`Estimate`.

    Raises:
        ValueError: fewer than 2 users, arrays not 1-D of one length or not finite, a
            denominator summing to 0 or less, or ``theta`` without a covariate.
    """
    ratio, linear = _linearise(numerator, denominator)
    if covariate is None:
        if theta is not None:
            raise ValueError("theta: given without a covariate")
        return _estimate(ratio, linear, None, None)
    return _estimate(ratio, linear, _column(covariate, "covariate", linear.size), theta)


def compare(control: Estimate, treatment: Estimate, alpha: float = 0.05) -> Comparison:
    """The treatment against the control (see :class:`Comparison` for each field).

    With CUPED estimates, each mean is adjusted to ``mean - theta * (covariate_mean - m)``,
    ``m`` being the users-weighted mean of both variants' ``covariate_mean``: randomisation
    makes the covariate's expected mean the same in both, so the adjustment removes the
    chance imbalance of the covariate without bias. Without one the means are the raw ones.

    With ``d`` the difference of the means, ``s = sqrt(variance_c + variance_t)`` and ``z``
    the ``1 - alpha / 2`` normal quantile: the absolute CI is ``d +- z * s``; the p-value is
    ``2 * P(Z > |d| / s)``; the relative lift's variance is ``var_t / m_c^2 + m_t^2 * var_c /
    m_c^4`` (delta method); ``probability_to_beat = P(D > 0)`` and ``expected_loss =
    E[max(0, -D)]`` for ``D ~ N(d, s^2)``.

    Raises:
        ValueError: ``alpha`` outside (0, 1), both variances 0 (nothing to test: e.g. no
            click in either variant), or a control mean of 0 (no relative lift).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: must lie in (0, 1), got {alpha}")
    users = control.users + treatment.users
    centre = (
        control.users * control.covariate_mean + treatment.users * treatment.covariate_mean
    ) / users
    base = control.mean - control.theta * (control.covariate_mean - centre)
    new = treatment.mean - treatment.theta * (treatment.covariate_mean - centre)
    variance = control.variance + treatment.variance
    if not variance > 0.0:
        raise ValueError("control, treatment: both variances are 0, there is nothing to test")
    if base == 0.0:
        raise ValueError("control: its mean is 0, the relative lift is undefined")
    diff, scale = new - base, math.sqrt(variance)
    t = diff / scale
    z = float(sps.norm.ppf(1.0 - alpha / 2.0))
    relative = new / base - 1.0
    relative_scale = math.sqrt(treatment.variance / base**2 + new**2 * control.variance / base**4)
    # E[max(0, -D)] for D ~ N(diff, scale^2), the normal's partial expectation below 0:
    # scale * (pdf(t) - t * P(Z > t)).
    loss = scale * (float(sps.norm.pdf(t)) - t * float(sps.norm.sf(t)))
    unadjusted = _unadjusted(control) + _unadjusted(treatment)
    return Comparison(
        absolute_lift=diff,
        absolute_ci=(diff - z * scale, diff + z * scale),
        relative_lift=relative,
        relative_ci=(relative - z * relative_scale, relative + z * relative_scale),
        p_value=float(2.0 * sps.norm.sf(abs(t))),
        probability_to_beat=float(sps.norm.cdf(t)),
        expected_loss=max(0.0, loss),
        variance_reduction=1.0 - variance / unadjusted if unadjusted > 0.0 else 0.0,
        control_mean=base,
        treatment_mean=new,
    )


def compare_ratio(
    num_c: npt.ArrayLike,
    den_c: npt.ArrayLike,
    num_t: npt.ArrayLike,
    den_t: npt.ArrayLike,
    cov_c: npt.ArrayLike | None = None,
    cov_t: npt.ArrayLike | None = None,
    alpha: float = 0.05,
) -> Comparison:
    """:func:`compare` of the ratio metrics of two variants given per-user sums (control
    ``num_c / den_c``, treatment ``num_t / den_t``), as :func:`ratio_estimate` makes them.

    With covariates (both or neither), one CUPED ``theta`` for both variants: the
    least-squares slope of the linearised metric on the covariate, each centred within its
    variant and pooled, so the treatment's effect does not leak into the coefficient.

    Raises:
        ValueError: as :func:`ratio_estimate` and :func:`compare`, or only one covariate.
    """
    if (cov_c is None) != (cov_t is None):
        raise ValueError("cov_c, cov_t: give both covariates or neither")
    ratio_c, linear_c = _linearise(num_c, den_c)
    ratio_t, linear_t = _linearise(num_t, den_t)
    if cov_c is None or cov_t is None:
        return compare(
            _estimate(ratio_c, linear_c, None, None),
            _estimate(ratio_t, linear_t, None, None),
            alpha,
        )
    covariate_c = _column(cov_c, "cov_c", linear_c.size)
    covariate_t = _column(cov_t, "cov_t", linear_t.size)
    theta = _slope([linear_c, linear_t], [covariate_c, covariate_t])
    return compare(
        _estimate(ratio_c, linear_c, covariate_c, theta),
        _estimate(ratio_t, linear_t, covariate_t, theta),
        alpha,
    )


def sample_ratio(
    observed: Sequence[int], weights: Sequence[float], threshold: float = SRM_THRESHOLD
) -> SampleRatio:
    """Pearson's chi-square test of the users per variant against the configured weights
    (``scipy.stats.chisquare``, expected counts ``total * weight / sum(weights)``).

    A variant of weight 0 gets no traffic: it is left out of the test, and one user in it is
    a mismatch (``chi2`` infinite, p-value 0). With no users, or a single variant of positive
    weight, there is nothing to test: ``chi2`` 0 and p-value 1.

    Raises:
        ValueError: fewer than 2 variants, lengths differ, a negative count or weight, the
            weights summing to 0, or ``threshold`` outside (0, 1).
    """
    counts = np.asarray(observed, dtype=np.int64)
    shares = np.asarray(weights, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or shares.shape != counts.shape:
        raise ValueError("observed, weights: need one count and one weight per variant, >= 2")
    if (counts < 0).any() or not (np.isfinite(shares).all() and (shares >= 0).all()):
        raise ValueError("observed, weights: must not be negative")
    if not shares.sum() > 0.0:
        raise ValueError("weights: must not sum to 0")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold: must lie in (0, 1), got {threshold}")
    shares = shares / shares.sum()
    served = shares > 0.0
    total = int(counts.sum())
    if counts[~served].any():
        chi2, p_value = math.inf, 0.0
    elif total == 0 or served.sum() < 2:
        chi2, p_value = 0.0, 1.0
    else:
        result = sps.chisquare(counts[served], f_exp=shares[served] * total)
        chi2, p_value = float(result.statistic), float(result.pvalue)
    return SampleRatio(
        observed=tuple(int(count) for count in counts),
        expected_share=tuple(float(share) for share in shares),
        chi2=chi2,
        p_value=p_value,
        mismatch=p_value < threshold,
    )


def gini(counts: npt.ArrayLike) -> float:
    """The Gini coefficient of impressions over items: 0 when every item of ``counts`` has
    as many, 1 when one item has them all.

    ``sum_i (2i - n - 1) x_(i) / ((n - 1) * sum x)`` over the counts sorted ascending
    (``x_(1) <= ... <= x_(n)``): the Lorenz-curve Gini scaled by ``n / (n - 1)``, so that
    its range is exactly [0, 1] for ``n`` items. Items never shown count when ``counts``
    has their zeros (one count per catalogue item); 0 for a single item.

    Raises:
        ValueError: ``counts`` empty, not 1-D, negative or not finite, or summing to 0.
    """
    values = np.sort(_column(counts, "counts"))
    if values.size == 0 or values[0] < 0.0 or not values.sum() > 0.0:
        raise ValueError("counts: need non-negative counts with a positive sum")
    n = values.size
    if n == 1:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2.0 * ranks - n - 1.0) * values) / ((n - 1) * values.sum()))


def coverage(counts: npt.ArrayLike, catalogue_size: int) -> float:
    """The share of a catalogue of ``catalogue_size`` items shown at least once, given
    impression ``counts`` per item (any subset of the catalogue, zeros allowed).

    Raises:
        ValueError: ``counts`` not 1-D, negative or not finite, ``catalogue_size`` below 1
            or below the number of counts.
    """
    values = _column(counts, "counts")
    if (values < 0.0).any():
        raise ValueError("counts: must not be negative")
    if catalogue_size < max(1, values.size):
        raise ValueError(f"catalogue_size: {catalogue_size} is less than the {values.size} counts")
    return np.count_nonzero(values) / catalogue_size


def analytic_power(lift: float, users_per_arm: int, variance: float, alpha: float = 0.05) -> float:
    """The power of :func:`compare`'s two-sided test (level ``alpha``) when the true
    absolute lift is ``lift``, with ``users_per_arm`` users in each of the two variants and
    a per-user ``variance`` of the metric in both (for a ratio metric, of its linearisation:
    :attr:`Estimate.user_variance`). ``statsmodels.stats.power.NormalIndPower`` with effect
    size ``|lift| / sqrt(variance)``; equals ``alpha`` at a lift of 0.

    Raises:
        ValueError: ``users_per_arm`` below 2, ``variance`` not positive, ``alpha`` outside
            (0, 1).
    """
    if users_per_arm < 2 or not variance > 0.0 or not 0.0 < alpha < 1.0:
        raise ValueError("users_per_arm >= 2, variance > 0 and alpha in (0, 1) are required")
    power = NormalIndPower().power(
        effect_size=abs(lift) / math.sqrt(variance),
        nobs1=users_per_arm,
        alpha=alpha,
        ratio=1.0,
        alternative="two-sided",
    )
    return float(power)


def _column(values: npt.ArrayLike, name: str, users: int | None = None) -> F64:
    """``values`` as a finite 1-D float64 array (of ``users`` rows when given)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or (users is not None and array.size != users):
        rows = "" if users is None else f" of {users} rows"
        raise ValueError(f"{name}: must be a 1-D array{rows}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: must be finite")
    return array


def _linearise(numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> tuple[float, F64]:
    """The ratio of sums and each user's linearised value (mean 0): see :func:`ratio_estimate`."""
    num = _column(numerator, "numerator")
    den = _column(denominator, "denominator", num.size)
    if num.size < 2:
        raise ValueError(f"numerator: need at least 2 users, got {num.size}")
    if not den.sum() > 0.0:
        raise ValueError("denominator: must sum to more than 0")
    ratio = float(num.sum() / den.sum())
    return ratio, (num - ratio * den) / den.mean()


def _slope(linear: Sequence[F64], covariate: Sequence[F64]) -> float:
    """Least-squares slope of the linearised values on the covariate, both centred within
    each variant and pooled over the variants; 0 when the covariate never varies."""
    centred = [c - c.mean() for c in covariate]
    # Element-wise products rather than BLAS dot products: on a loaded machine, a BLAS call
    # waiting for its threads costs ten times the arithmetic.
    cross = sum(float(np.sum(lin * c)) for lin, c in zip(linear, centred, strict=True))
    spread = sum(float(np.sum(c * c)) for c in centred)
    return cross / spread if spread > 0.0 else 0.0


def _estimate(ratio: float, linear: F64, covariate: F64 | None, theta: float | None) -> Estimate:
    unadjusted = float(linear.var(ddof=1)) / linear.size
    if covariate is None:
        return Estimate(ratio, unadjusted, linear.size, unadjusted_variance=unadjusted)
    slope = _slope([linear], [covariate]) if theta is None else theta
    mean = float(covariate.mean())
    adjusted = float((linear - slope * (covariate - mean)).var(ddof=1)) / linear.size
    return Estimate(ratio, adjusted, linear.size, slope, mean, unadjusted)


def _unadjusted(estimate: Estimate) -> float:
    if estimate.unadjusted_variance is None:
        return estimate.variance
    return estimate.unadjusted_variance
