"""Logged propensities of the synthetic world's impressions (what its logging system knew).

Each logged impression fills one slot, whose source is drawn independently: exploration
(:data:`training.world.EXPLORATION_SHARE`, a uniformly random item), global popularity
(:data:`training.world.POPULAR_EXPOSURE_SHARE`, item ``i`` with its exposure probability
``e_i``) or the logging policy (the rest). So the probability that a slot shows item ``i``
to user ``u`` is

    p(u, i) = x / N + s * e_i + (1 - x - s) * pi(i | u)

where the policy picks a category ``c`` with probability ``softmax(pref_u)[c]``, draws
``K = LOGGING_CANDIDATES`` candidates from it with probabilities ``q`` (its items'
``e^WITHIN_CATEGORY_SKEW``, normalised) and shows the best by true click logit ``l`` plus
Gumbel noise of scale ``LOGGING_NOISE``. By the Gumbel-max trick a candidate set ``S`` shows
its ``k``-th member with probability ``exp(l_k / g) / sum_{j in S} exp(l_j / g)``, hence

    pi(i | u, c) = K q_i E[ exp(l_i / g) / (exp(l_i / g) + sum of the K - 1 others') ]

with the expectation over the other candidates, estimated by Monte Carlo (``draws`` sets
per impression, seeded). A real logging system records this number as it serves; the
world recomputes it from its hidden truth, which is what the previous recommender scored
with. It is used for inverse-propensity weighting (:func:`training.ranker.ipw_weights`) and
by the unbiased-learning comparison of :mod:`training.mtl`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from training.world import (
    EXPLORATION_SHARE,
    LOGGING_CANDIDATES,
    LOGGING_NOISE,
    POPULAR_EXPOSURE_SHARE,
    WITHIN_CATEGORY_SKEW,
    Interactions,
    World,
    _sample_in_category,
)

F64 = NDArray[np.float64]
_CHUNK = 32768


def logging_propensities(world: World, logs: Interactions, draws: int = 16, seed: int = 0) -> F64:
    """``p(u, i)`` of the module docstring for every impression of ``logs``."""
    truth = world.truth
    n_items = world.config.n_items
    users, items = logs.users, logs.items
    categories = truth.item_categories[items].astype(np.int64)
    pref = truth.user_category_pref.astype(np.float64)
    category_p = np.exp(pref - pref.max(axis=1, keepdims=True))
    category_p /= category_p.sum(axis=1, keepdims=True)
    weights = truth.item_exposure**WITHIN_CATEGORY_SKEW
    totals = np.bincount(truth.item_categories, weights=weights, minlength=pref.shape[1])
    q = weights[items] / totals[categories]
    rng = np.random.default_rng(seed)
    others = LOGGING_CANDIDATES - 1
    within = np.empty(len(logs), dtype=np.float64)
    for start in range(0, len(logs), _CHUNK):
        sl = slice(start, min(start + _CHUNK, len(logs)))
        u, i, c = users[sl], items[sl], categories[sl]
        own = np.exp(truth.click_logits(u, i).astype(np.float64) / LOGGING_NOISE)
        reps = draws * others
        drawn = _sample_in_category(
            rng, truth, weights, world.config.n_categories, np.repeat(c, reps)
        )
        rival = np.exp(
            truth.click_logits(np.repeat(u, reps), drawn).astype(np.float64) / LOGGING_NOISE
        )
        rival_sum = rival.reshape(-1, draws, others).sum(axis=2)
        within[sl] = (own[:, None] / (own[:, None] + rival_sum)).mean(axis=1)
    policy = category_p[users, categories] * LOGGING_CANDIDATES * q * within
    policy_share = 1.0 - EXPLORATION_SHARE - POPULAR_EXPOSURE_SHARE
    return np.asarray(
        EXPLORATION_SHARE / n_items
        + POPULAR_EXPOSURE_SHARE * truth.item_exposure[items]
        + policy_share * policy,
        dtype=np.float64,
    )
