"""A seeded synthetic world: users, items, hidden ground truth and logged interactions.

The world stands in for production logs. It has two layers:

* **Ground truth** (:class:`GroundTruth`), hidden from every model: latent user and item
  preference vectors, per-user category preferences, a Zipf-like exposure popularity per
  item, item freshness, and a second pair of latent factors that drives conversion.
* **Observables**, which is all that training and serving get: dense user and item feature
  vectors (noisy projections of the latents plus summaries) and logged impressions with
  click and conversion outcomes, split by time into train and held-out parts.

Ground-truth click probability given an impression is::

    sigmoid(LATENT_WEIGHT * <p_u, q_i> + CATEGORY_WEIGHT * pref[u, cat(i)]
            + POPULARITY_WEIGHT * zlogpop(i) + FRESHNESS_WEIGHT * fresh(i) + CLICK_BIAS)

and conversion probability given a click is ``sigmoid(CONVERSION_WEIGHT * <r_u, w_i> +
CONVERSION_BIAS)``. Impressions are exposure-biased: :data:`POPULAR_EXPOSURE_SHARE` of them
come from global popularity; the rest from a logging policy (a previous recommender) that
picks a category by the user's preference and shows the best of a few popularity-drawn
items of it by noisy ground-truth score.

Observable feature layout (each column standardised over rows):

* user ``[U]``: noisy projection of ``(p_u, r_u)`` (``U - 9`` columns), noisy summary of
  category affinity (affinity-weighted category embedding, 8), log train impressions (1).
* item ``[I]``: noisy projection of ``(q_i, w_i)`` (``I - 10``), category embedding (8),
  log(1 + train clicks) (1), freshness (1).

Everything is vectorised numpy and drawn from one ``numpy.random.Generator`` seeded by
:attr:`WorldConfig.seed`, so the same config always yields the same world, bit for bit.
Memory and time grow linearly in users, items and impressions (1,000,000 items is fine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
Bools = NDArray[np.bool_]

CATEGORY_EMBED_DIM = 8
"""Width of the category block in item features and of the affinity summary in user features."""

LATENT_WEIGHT = 4.0
CATEGORY_WEIGHT = 0.8
POPULARITY_WEIGHT = 0.3
FRESHNESS_WEIGHT = 1.0
CLICK_BIAS = -3.5
CONVERSION_WEIGHT = 4.0
CONVERSION_BIAS = -1.0
EXPLORATION_SHARE = 0.1
"""Share of impressions from the exploration slice: uniformly random items, whatever the
user (the serving mesh's ``explore`` source). Their outcomes are free of exposure bias."""
POPULAR_EXPOSURE_SHARE = 0.3
"""Share of impressions drawn from global popularity; the rest follow category preference."""
ZIPF_EXPONENT = 0.9
WITHIN_CATEGORY_SKEW = 0.5
"""Exponent applied to exposure popularity when the logging policy samples inside a category."""
LOGGING_CANDIDATES = 8
LOGGING_NOISE = 1.0
"""Gumbel scale of the logging policy's choice among its candidates (0 would be greedy)."""
SOURCE_POLICY, SOURCE_POPULAR, SOURCE_EXPLORE = 0, 1, 2
"""Values of :attr:`Interactions.sources`."""
FEATURE_NOISE = 0.3
"""Std of the noise added to latent projections, relative to the projection's own std."""


@dataclass(frozen=True)
class WorldConfig:
    """Size and seed of a world. Invalid combinations raise ``ValueError`` at construction."""

    n_users: int = 5000
    n_items: int = 20000
    n_categories: int = 50
    latent_dim: int = 16
    conversion_dim: int = 4
    user_feature_dim: int = 32
    item_feature_dim: int = 32
    impressions_per_user: int = 100
    """Mean impressions per user; each user's count scales with a hidden activity level."""
    heldout_fraction: float = 0.2
    """Per user, this share of impressions (the latest by time, at least one) is held out."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 2 or self.n_categories < 1:
            raise ValueError("a world needs at least 1 user, 2 items and 1 category")
        if self.n_categories > self.n_items:
            raise ValueError("n_categories cannot exceed n_items")
        if self.user_feature_dim < CATEGORY_EMBED_DIM + 1 + 4:
            raise ValueError(f"user_feature_dim must be >= {CATEGORY_EMBED_DIM + 5}")
        if self.item_feature_dim < CATEGORY_EMBED_DIM + 2 + 4:
            raise ValueError(f"item_feature_dim must be >= {CATEGORY_EMBED_DIM + 6}")
        if self.impressions_per_user < 3:
            raise ValueError("impressions_per_user must be >= 3")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError("heldout_fraction must be in (0, 1)")


@dataclass(frozen=True)
class Interactions:
    """Logged impressions, sorted by (user, time). All arrays have the same length."""

    users: I64
    items: I64
    times: F64
    """Impression time in [0, 1); only the order within a user matters."""
    clicked: Bools
    converted: Bools
    """Converted implies clicked."""
    sources: NDArray[np.int8]
    """Which slot filled each impression: :data:`SOURCE_POLICY`, :data:`SOURCE_POPULAR` or
    :data:`SOURCE_EXPLORE`."""

    @property
    def explored(self) -> Bools:
        """True for impressions of the exploration slice (uniformly random items)."""
        return np.asarray(self.sources == SOURCE_EXPLORE)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def select(self, mask: Bools) -> Interactions:
        """The impressions where ``mask`` is true, in the same order."""
        return Interactions(
            users=self.users[mask],
            items=self.items[mask],
            times=self.times[mask],
            clicked=self.clicked[mask],
            converted=self.converted[mask],
            sources=self.sources[mask],
        )


@dataclass(frozen=True)
class OracleScores:
    """Ground-truth probabilities; ``conversion`` is P(click and conversion)."""

    click: F32
    conversion: F32

    @property
    def expected_gain(self) -> F32:
        """Expected graded relevance with gain 1 per click and 1 more per conversion."""
        return self.click + self.conversion


@dataclass(frozen=True)
class GroundTruth:
    """Hidden parameters of the world. Models never see these; evaluation does."""

    user_latent: F32
    user_category_pref: F32
    user_conversion: F32
    user_activity: F64
    item_latent: F32
    item_conversion: F32
    item_categories: NDArray[np.int32]
    item_exposure: F64
    """Probability of each item under popularity exposure (Zipf-like, sums to 1)."""
    item_freshness: F32
    """exp(-age), in (0, 1]."""
    item_static_logit: F32
    """The item-only part of the click logit (popularity and freshness)."""

    def click_logits(self, users: I64, items: I64) -> F32:
        """Ground-truth click logits for aligned pairs ``(users[k], items[k])``."""
        latent = np.einsum("ij,ij->i", self.user_latent[users], self.item_latent[items])
        category = self.user_category_pref[users, self.item_categories[items]]
        logit = (
            LATENT_WEIGHT * latent
            + CATEGORY_WEIGHT * category
            + self.item_static_logit[items]
            + CLICK_BIAS
        )
        return np.asarray(logit, dtype=np.float32)

    def pair_scores(self, users: I64, items: I64) -> OracleScores:
        """Ground-truth probabilities for aligned pairs ``(users[k], items[k])``."""
        click_logit = self.click_logits(users, items)
        conv = np.einsum("ij,ij->i", self.user_conversion[users], self.item_conversion[items])
        return _probabilities(click_logit, CONVERSION_WEIGHT * conv + CONVERSION_BIAS)

    def click_logit_matrix(self, users: I64, items: I64) -> F32:
        """Ground-truth click logits ``[len(users), len(items)]``; ranking by these equals
        ranking by click probability, without paying for the sigmoid."""
        logit = self.user_latent[users] @ (LATENT_WEIGHT * self.item_latent[items].T)
        logit += CATEGORY_WEIGHT * self.user_category_pref[users][:, self.item_categories[items]]
        logit += self.item_static_logit[items][None, :] + np.float32(CLICK_BIAS)
        return logit

    def matrix_scores(self, users: I64, items: I64) -> OracleScores:
        """Ground-truth probabilities for every user in ``users`` against every item in
        ``items``, as ``[len(users), len(items)]`` matrices."""
        conv = self.user_conversion[users] @ self.item_conversion[items].T
        return _probabilities(
            self.click_logit_matrix(users, items), CONVERSION_WEIGHT * conv + CONVERSION_BIAS
        )


@dataclass(frozen=True)
class World:
    """A generated world: its config, hidden truth, observable features and logs.

    Attributes:
        user_features: float32 ``[n_users, user_feature_dim]``, column-standardised.
        item_features: float32 ``[n_items, item_feature_dim]``, column-standardised.
        item_categories: int32 ``[n_items]``.
        train: impressions before each user's held-out cut.
        heldout: each user's latest impressions (``heldout_fraction`` of them, at least one).
    """

    config: WorldConfig
    truth: GroundTruth
    user_features: F32
    item_features: F32
    item_categories: NDArray[np.int32]
    train: Interactions
    heldout: Interactions

    def oracle_scores(self, user_rows: I64, item_ids: I64 | None = None) -> OracleScores:
        """Ground-truth scores of each user in ``user_rows`` against ``item_ids`` (all items
        when None), as ``[len(user_rows), n]`` float32 matrices."""
        items = np.arange(self.config.n_items) if item_ids is None else item_ids
        return self.truth.matrix_scores(user_rows, items)

    def simulate(self, users: I64, items: I64, seed: int) -> tuple[Bools, Bools]:
        """Draw (clicked, converted) outcomes of showing ``items[k]`` to ``users[k]``."""
        rng = np.random.default_rng(seed)
        return _draw_outcomes(rng, self.truth.pair_scores(users, items))

    def train_click_counts(self) -> I64:
        """Number of train clicks per item, ``[n_items]``."""
        return _click_counts(self.train, self.config.n_items)


def generate_world(config: WorldConfig) -> World:
    """Generate the world for ``config``; deterministic in ``config`` (including its seed)."""
    rng = np.random.default_rng(config.seed)
    truth = _ground_truth(rng, config)
    logs = _simulate_logs(rng, config, truth)
    train, heldout = _split_by_time(logs, config)
    category_embedding = rng.standard_normal(
        (config.n_categories, CATEGORY_EMBED_DIM), dtype=np.float32
    )
    clicks = _click_counts(train, config.n_items)
    impressions = np.bincount(train.users, minlength=config.n_users)
    user_features = _user_features(rng, config, truth, category_embedding, impressions)
    item_features = _item_features(rng, config, truth, category_embedding, clicks)
    return World(
        config=config,
        truth=truth,
        user_features=user_features,
        item_features=item_features,
        item_categories=truth.item_categories,
        train=train,
        heldout=heldout,
    )


def _click_counts(logs: Interactions, n_items: int) -> I64:
    return np.bincount(logs.items[logs.clicked], minlength=n_items).astype(np.int64)


def _probabilities(
    click_logit: NDArray[np.floating], conv_logit: NDArray[np.floating]
) -> OracleScores:
    click = _sigmoid(click_logit)
    return OracleScores(click=click, conversion=click * _sigmoid(conv_logit))


def _sigmoid(x: NDArray[np.floating]) -> F32:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float32)


def _unit_gaussian(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """Rows with entries N(0, 1/dim), so each row has norm close to 1."""
    scale = np.float32(1.0 / np.sqrt(shape[1]))
    return rng.standard_normal(shape, dtype=np.float32) * scale


def _ground_truth(rng: np.random.Generator, config: WorldConfig) -> GroundTruth:
    n_users, n_items, n_cat = config.n_users, config.n_items, config.n_categories
    category_share = 1.0 / np.arange(1, n_cat + 1) ** 0.8
    category_share /= category_share.sum()
    # Every category gets at least one item; the rest follow the skewed share.
    categories = np.concatenate(
        [np.arange(n_cat), rng.choice(n_cat, size=n_items - n_cat, p=category_share)]
    )
    rng.shuffle(categories)
    centers = _unit_gaussian(rng, (n_cat, config.latent_dim))
    item_latent = 0.5 * centers[categories] + np.float32(np.sqrt(0.75)) * _unit_gaussian(
        rng, (n_items, config.latent_dim)
    )
    popularity_rank = rng.permutation(n_items)
    exposure = np.asarray(1.0 / (popularity_rank + 1.0) ** ZIPF_EXPONENT, dtype=np.float64)
    exposure /= exposure.sum()
    log_pop = np.log(exposure)
    zlogpop = (log_pop - log_pop.mean()) / log_pop.std()
    freshness = np.exp(-rng.exponential(1.0, size=n_items)).astype(np.float32)
    static_logit = (POPULARITY_WEIGHT * zlogpop + FRESHNESS_WEIGHT * freshness).astype(np.float32)
    activity = rng.lognormal(0.0, 0.5, size=n_users)
    return GroundTruth(
        user_latent=_unit_gaussian(rng, (n_users, config.latent_dim)),
        user_category_pref=(1.5 * rng.standard_normal((n_users, n_cat))).astype(np.float32),
        user_conversion=_unit_gaussian(rng, (n_users, config.conversion_dim)),
        user_activity=activity / activity.mean(),
        item_latent=item_latent,
        item_conversion=_unit_gaussian(rng, (n_items, config.conversion_dim)),
        item_categories=categories.astype(np.int32),
        item_exposure=exposure,
        item_freshness=freshness,
        item_static_logit=static_logit,
    )


def _sample_rows(rng: np.random.Generator, probs: F64, rows: I64) -> I64:
    """For each ``rows[k]``, draw a column index from the distribution ``probs[rows[k]]``.

    One ``searchsorted`` over the row-offset flattened CDF: row r's CDF lives in (r, r+1].
    """
    n_rows, n_cols = probs.shape
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    flat = (cdf + np.arange(n_rows)[:, None]).ravel()
    draws = rows + rng.random(rows.shape[0]) * (1.0 - 1e-12)
    picked = np.searchsorted(flat, draws, side="right") - rows * n_cols
    return np.asarray(np.minimum(picked, n_cols - 1), dtype=np.int64)


def _sample_in_category(
    rng: np.random.Generator, truth: GroundTruth, weights: F64, n_categories: int, categories: I64
) -> I64:
    """Draw one item per entry of ``categories``, with probability proportional to
    ``weights`` (one positive weight per item) among the items of that category."""
    order = np.argsort(truth.item_categories, kind="stable")
    sorted_cat = truth.item_categories[order]
    weights = weights[order]
    totals = np.bincount(sorted_cat, weights=weights, minlength=n_categories)
    sizes = np.bincount(sorted_cat, minlength=n_categories)
    # Category k's CDF occupies (k, k+1] on one global axis.
    within = np.cumsum(weights) - np.repeat(np.cumsum(totals) - totals, sizes)
    axis = sorted_cat + within / totals[sorted_cat]
    draws = categories + rng.random(categories.shape[0]) * (1.0 - 1e-12)
    pos = np.searchsorted(axis, draws, side="left")
    ends = np.cumsum(sizes)
    pos = np.clip(pos, (ends - sizes)[categories], ends[categories] - 1)
    return order[pos].astype(np.int64)


def _draw_outcomes(rng: np.random.Generator, scores: OracleScores) -> tuple[Bools, Bools]:
    draw = rng.random(scores.click.shape[0])
    clicked = draw < scores.click
    converted = draw < scores.conversion  # P(conversion) <= P(click): converted => clicked
    return clicked, converted


def _simulate_logs(
    rng: np.random.Generator, config: WorldConfig, truth: GroundTruth
) -> Interactions:
    counts = np.maximum(3, rng.poisson(config.impressions_per_user * truth.user_activity))
    users = np.repeat(np.arange(config.n_users, dtype=np.int64), counts)
    total = users.shape[0]
    items = np.empty(total, dtype=np.int64)
    source = rng.random(total)
    explored = source < EXPLORATION_SHARE
    popular = ~explored & (source < EXPLORATION_SHARE + POPULAR_EXPOSURE_SHARE)
    policy = ~(explored | popular)
    items[explored] = rng.integers(0, config.n_items, size=int(explored.sum()), dtype=np.int64)
    items[popular] = rng.choice(config.n_items, size=int(popular.sum()), p=truth.item_exposure)
    items[policy] = _logging_policy(rng, config, truth, users[policy])
    sources = np.full(total, SOURCE_POLICY, dtype=np.int8)
    sources[popular] = SOURCE_POPULAR
    sources[explored] = SOURCE_EXPLORE
    times = rng.random(total)
    order = np.lexsort((times, users))
    users, items, times, sources = users[order], items[order], times[order], sources[order]
    clicked, converted = _draw_outcomes(rng, truth.pair_scores(users, items))
    return Interactions(users, items, times, clicked, converted, sources)


def _logging_policy(
    rng: np.random.Generator, config: WorldConfig, truth: GroundTruth, users: I64
) -> I64:
    """The previous recommender: for each slot, pick a category by the user's preference,
    draw ``LOGGING_CANDIDATES`` items from it (flattened popularity), and show the one with
    the best ground-truth click logit perturbed by Gumbel noise."""
    pref = truth.user_category_pref.astype(np.float64)
    category_probs = np.exp(pref - pref.max(axis=1, keepdims=True))
    categories = _sample_rows(rng, category_probs, users)
    slots = np.repeat(categories, LOGGING_CANDIDATES)
    weights = truth.item_exposure**WITHIN_CATEGORY_SKEW
    candidates = _sample_in_category(rng, truth, weights, config.n_categories, slots)
    logits = truth.click_logits(np.repeat(users, LOGGING_CANDIDATES), candidates)
    noisy = logits + rng.gumbel(size=logits.shape[0]) * LOGGING_NOISE
    best = np.argmax(noisy.reshape(-1, LOGGING_CANDIDATES), axis=1)
    chosen = candidates.reshape(-1, LOGGING_CANDIDATES)[np.arange(users.shape[0]), best]
    return np.asarray(chosen, dtype=np.int64)


def _split_by_time(logs: Interactions, config: WorldConfig) -> tuple[Interactions, Interactions]:
    counts = np.bincount(logs.users, minlength=config.n_users)
    starts = np.cumsum(counts) - counts
    position = np.arange(len(logs)) - starts[logs.users]
    n_heldout = np.maximum(1, np.round(counts * config.heldout_fraction)).astype(np.int64)
    heldout = position >= (counts - n_heldout)[logs.users]
    return logs.select(~heldout), logs.select(heldout)


def _standardise(x: F64) -> F32:
    std = x.std(axis=0)
    return np.asarray((x - x.mean(axis=0)) / np.where(std > 0, std, 1.0), dtype=np.float32)


def _noisy_projection(rng: np.random.Generator, signal: F32, width: int) -> F64:
    projection = rng.standard_normal((signal.shape[1], width)) / np.sqrt(signal.shape[1])
    clean = signal.astype(np.float64) @ projection
    noise = rng.standard_normal(clean.shape) * (FEATURE_NOISE * clean.std())
    return np.asarray(clean + noise, dtype=np.float64)


def _user_features(
    rng: np.random.Generator,
    config: WorldConfig,
    truth: GroundTruth,
    category_embedding: F32,
    impressions: I64,
) -> F32:
    width = config.user_feature_dim - CATEGORY_EMBED_DIM - 1
    signal = np.concatenate([truth.user_latent, truth.user_conversion], axis=1)
    projection = _noisy_projection(rng, signal, width)
    pref = truth.user_category_pref.astype(np.float64)
    affinity = np.exp(pref - pref.max(axis=1, keepdims=True))
    affinity /= affinity.sum(axis=1, keepdims=True)
    summary = affinity @ category_embedding.astype(np.float64)
    summary += rng.standard_normal(summary.shape) * (FEATURE_NOISE * summary.std())
    activity = np.log1p(impressions.astype(np.float64))[:, None]
    return _standardise(np.concatenate([projection, summary, activity], axis=1))


def _item_features(
    rng: np.random.Generator,
    config: WorldConfig,
    truth: GroundTruth,
    category_embedding: F32,
    clicks: I64,
) -> F32:
    width = config.item_feature_dim - CATEGORY_EMBED_DIM - 2
    signal = np.concatenate([truth.item_latent, truth.item_conversion], axis=1)
    projection = _noisy_projection(rng, signal, width)
    category = category_embedding[truth.item_categories].astype(np.float64)
    log_pop = np.log1p(clicks.astype(np.float64))[:, None]
    fresh = truth.item_freshness.astype(np.float64)[:, None]
    return _standardise(np.concatenate([projection, category, log_pop, fresh], axis=1))
