"""Off-policy estimates of a candidate policy's click-through rate from logged impressions.

Pure functions of per-impression arrays (numpy, scipy; no I/O): what ``recmesh ope``
(:mod:`training.ope`) computes once it has read the log and run the candidate's models.

**The action space: item-level inclusion.** An answer to a context ``x`` (the user as the
policy sees them) is a slate of ``n`` items; the estimators treat each item's *inclusion*
in the slate as the action: the logging policy included item ``i`` with probability
``mu(i | x)`` (the logged ``propensity``) and the candidate would include it with
probability ``pi(i | x)``. ``sum_i pi(i | x) = n_pi``, the candidate's slate size. The
candidate's CTR is its expected clicks per impression,

    V(pi) = E_x [ sum_i pi(i | x) q(x, i) ] / n_pi,

``q(x, i)`` the probability that item ``i`` is clicked when shown to ``x``. This assumes
that the click on an item does not depend on the slot it is shown in nor on the other
items of the slate (no position bias, no interaction): true of the synthetic world, where
``P(click | shown)`` is a function of user and item alone. Under position bias the same
estimators would need the probability of each (item, slot) pair, which is not logged.

**Identifiability.** ``V(pi)`` is identified from the log when every item the candidate
can show was possible under the logging policy (``mu(i | x) > 0`` wherever
``pi(i | x) > 0``) and the logged propensity is ``mu(i | x)`` for the context the
candidate sees, the *marginal* probability given that context, not a probability
conditional on something the log does not hold (such as a candidate list drawn per
request). The simulated serve (:mod:`training.simulate`) logs exactly that, and its
uniform exploration slot gives every item of the catalogue a positive propensity. The
mesh's logs hold probabilities given each answer's candidates *and* those candidates (its
logged support, :mod:`core.explore`): with the support as part of the context they are
``mu(i | x)``, for candidates that choose from the same support (:mod:`training.ope`).

**Estimators.** With ``w = min(pi / mu, clip)`` per impression (the cap keeps a few
impressions with a tiny logged propensity from dominating; clipping biases the estimates
towards 0 when it binds, and :attr:`OffPolicyEstimate.clipped` says how often it did), the
answers (requests) as the independent units, ``c`` the click and ``R`` the answers:

* **IPS**: ``(1 / R) sum_r (sum_{k in r} w_k c_k) / n_pi``, with the variance of that mean;
* **SNIPS** (self-normalised): ``sum_k w_k c_k / sum_k w_k``, a ratio whose variance is the
  delta method's over the answers (:func:`core.experiments.stats.ratio_estimate`);
* **DR** (doubly robust): ``(1 / R) sum_r (D_r + sum_{k in r} w_k (c_k - qhat_k)) / n_pi``,
  with ``qhat`` a model's click probability of each logged impression and ``D_r`` the direct
  method's value of the answer's context, ``sum_i pi(i | x_r) qhat(x_r, i)`` over every
  item ``pi`` may show (the catalogue, or the answer's support): unbiased when either the
  weights or the model are right, and with less variance than IPS when the model is close;
* **naive**: the logged CTR, clicks per impression (what the logging policy achieved), with
  the delta-method variance over the answers: biased for any other policy.

Intervals are normal, ``estimate ± z se`` with ``z = scipy.stats.norm.ppf(1 - alpha / 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from core.experiments.stats import ratio_estimate

F64 = npt.NDArray[np.float64]

DEFAULT_CLIP = 100.0
"""Default cap of an importance weight ``pi / mu``.

Under the simulated serve a weight is at most about ``(m_pi + e_pi) / e_mu``: the
candidate's candidates and exploration slots over the logging policy's exploration slots
(101 with the defaults, for an item the candidate shows whenever it draws it and the logger
showed only by exploring). The cap sits at that bound, so between default policies it
lowers only those weights, by under 1 %; lower caps trade bias for variance
(``docs/experiments.md``, "Off-policy evaluation")."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its standard error and two-sided ``1 - alpha`` interval."""

    estimate: float
    standard_error: float
    low: float
    high: float

    def covers(self, value: float) -> bool:
        """Whether ``value`` lies in ``[low, high]``."""
        return self.low <= value <= self.high


@dataclass(frozen=True)
class OffPolicyEstimate:
    """Estimates of a candidate policy's CTR from one log (see the module docstring).

    Attributes:
        naive: the logged CTR (clicks per logged impression).
        ips: inverse propensity scoring.
        snips: self-normalised inverse propensity scoring.
        dr: doubly robust; None when no click model was given.
        effective_sample_size: Kish's ``(sum w)^2 / sum w^2`` over the impressions, clipped
            weights: how many impressions drawn from the candidate itself the weighted log
            is worth, roughly.
        requests: answers (the independent units).
        impressions: logged impressions used.
        clicks: their clicks.
        clip: the weight cap applied.
        clipped: impressions whose weight the cap lowered.
        max_weight: the largest weight before clipping.
        mean_weight: the mean clipped weight; near ``n_pi / n_mu`` (candidate over logged
            slate size) when the propensities are right and the cap does not bind.
    """

    naive: Interval
    ips: Interval
    snips: Interval
    dr: Interval | None
    effective_sample_size: float
    requests: int
    impressions: int
    clicks: int
    clip: float
    clipped: int
    max_weight: float
    mean_weight: float


def importance_weights(
    target: npt.ArrayLike, logged: npt.ArrayLike, clip: float = DEFAULT_CLIP
) -> tuple[F64, int]:
    """``min(target / logged, clip)`` per impression, and how many the cap lowered.

    Raises:
        ValueError: a logged propensity outside ``(0, 1]``, a target probability outside
            ``[0, 1]``, different lengths, or a cap that is not positive.
    """
    pi = np.asarray(target, dtype=np.float64)
    mu = np.asarray(logged, dtype=np.float64)
    if pi.shape != mu.shape or pi.ndim != 1:
        raise ValueError("target and logged must be 1-d arrays of the same length")
    if not (clip > 0):
        raise ValueError("clip must be positive")
    if mu.size and not (np.all(mu > 0) and np.all(mu <= 1)):
        raise ValueError("logged propensities must lie in (0, 1]")
    if pi.size and not (np.all(pi >= 0) and np.all(pi <= 1)):
        raise ValueError("target probabilities must lie in [0, 1]")
    raw = pi / mu
    return np.minimum(raw, clip), int(np.count_nonzero(raw > clip))


def estimate_ctr(
    *,
    clicks: npt.ArrayLike,
    target: npt.ArrayLike,
    logged: npt.ArrayLike,
    requests: npt.ArrayLike,
    slate_size: int,
    predicted: npt.ArrayLike | None = None,
    direct: npt.ArrayLike | None = None,
    clip: float = DEFAULT_CLIP,
    alpha: float = 0.05,
) -> OffPolicyEstimate:
    """The candidate's CTR from logged impressions: naive, IPS, SNIPS and DR estimates.

    Args:
        clicks: 1 when the impression was clicked, else 0, per logged impression.
        target: the candidate's probability of including the impression's item in its
            answer to the impression's context, ``pi(i | x)``.
        logged: the logged propensity ``mu(i | x)``, in ``(0, 1]``.
        requests: the impression's answer as an integer code ``0 .. R - 1``, every code
            present (``numpy.unique(..., return_inverse=True)`` makes them).
        slate_size: ``n_pi``, the candidate's slots per answer (``sum_i pi(i | x)``).
        predicted: for DR, a click model's probability of each impression, ``qhat``.
        direct: for DR, per answer code, ``sum_i pi(i | x_r) qhat(x_r, i)`` over every item.
        clip: the weight cap (:data:`DEFAULT_CLIP`).
        alpha: ``1 -`` the intervals' coverage.

    Raises:
        ValueError: inconsistent lengths or codes, fewer than two answers, a propensity or
            probability out of range (see :func:`importance_weights`), only one of
            ``predicted`` and ``direct``, or ``slate_size`` below 1.
    """
    c = np.asarray(clicks, dtype=np.float64)
    codes = np.asarray(requests)
    weights, clipped = importance_weights(target, logged, clip)
    if c.shape != weights.shape or codes.shape != weights.shape:
        raise ValueError("clicks, target, logged and requests must have the same length")
    if not np.all((c == 0) | (c == 1)):
        raise ValueError("clicks must be 0 or 1")
    if slate_size < 1:
        raise ValueError("slate_size must be at least 1")
    if (predicted is None) != (direct is None):
        raise ValueError("DR needs both predicted and direct")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")
    if codes.size == 0 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError("requests must be integer codes of the answers")
    n_requests = int(codes.max()) + 1
    if codes.min() < 0 or np.unique(codes).size != n_requests:
        raise ValueError("requests must use every code 0 .. R - 1")
    if n_requests < 2:
        raise ValueError("need at least two answers")
    z = float(sps.norm.ppf(1.0 - alpha / 2.0))
    raw = np.asarray(target, dtype=np.float64) / np.asarray(logged, dtype=np.float64)

    impressions = _per_request(codes, np.ones_like(c), n_requests)
    clicks_per = _per_request(codes, c, n_requests)
    weighted = _per_request(codes, weights * c, n_requests)
    weight_sum = _per_request(codes, weights, n_requests)

    naive = _ratio(clicks_per, impressions, z)
    ips = _mean(weighted / slate_size, z)
    snips = _ratio(weighted, weight_sum, z)
    dr: Interval | None = None
    if predicted is not None and direct is not None:
        qhat = np.asarray(predicted, dtype=np.float64)
        value = np.asarray(direct, dtype=np.float64)
        if qhat.shape != c.shape or value.shape != (n_requests,):
            raise ValueError("predicted must be per impression and direct per answer code")
        correction = _per_request(codes, weights * (c - qhat), n_requests)
        dr = _mean((value + correction) / slate_size, z)
    total = float(weights.sum())
    squares = float((weights**2).sum())
    return OffPolicyEstimate(
        naive=naive,
        ips=ips,
        snips=snips,
        dr=dr,
        effective_sample_size=total * total / squares if squares > 0 else 0.0,
        requests=n_requests,
        impressions=int(c.size),
        clicks=int(c.sum()),
        clip=float(clip),
        clipped=clipped,
        max_weight=float(raw.max()),
        mean_weight=float(weights.mean()),
    )


def _per_request(codes: npt.NDArray[np.integer], values: F64, n_requests: int) -> F64:
    return np.asarray(np.bincount(codes, weights=values, minlength=n_requests), dtype=np.float64)


def _mean(values: F64, z: float) -> Interval:
    mean = float(values.mean())
    se = float(values.std(ddof=1) / np.sqrt(values.size))
    return Interval(mean, se, mean - z * se, mean + z * se)


def _ratio(numerator: F64, denominator: F64, z: float) -> Interval:
    if not float(denominator.sum()) > 0:
        return Interval(0.0, 0.0, 0.0, 0.0)
    ratio = ratio_estimate(numerator, denominator)
    se = float(np.sqrt(ratio.variance))
    return Interval(ratio.mean, se, ratio.mean - z * se, ratio.mean + z * se)
