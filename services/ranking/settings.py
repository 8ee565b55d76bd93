"""Settings of the ranking service.

Counts, re-rank knobs and stage budgets here are the service defaults; a tenant's policy
file (``RECMESH_RANKING_POLICIES``, see :mod:`services.ranking.policy`) overrides them per
tenant, and an experiment variant overrides both per request (``RankRequest`` fields).
"""

from __future__ import annotations

from dataclasses import dataclass

from core import explore
from mesh.errors import ConfigError
from mesh.settings import env, metrics_port_of, port_of
from services.runtime.model_service import ModelServingSettings


@dataclass(frozen=True)
class RankingSettings(ModelServingSettings):
    """Environment of the ranking service process. Budgets are in seconds."""

    service_name: str = "ranking"
    port: int = port_of("ranking")
    metrics_port: int = metrics_port_of("ranking")
    max_candidates: int = env(
        "RECMESH_RANKING_MAX_CANDIDATES", 3000, doc="largest candidate list accepted"
    )
    max_items: int = env("RECMESH_RANKING_MAX_ITEMS", 500, doc="largest num_items accepted")
    head_weights: str = env(
        "RECMESH_RANKING_HEAD_WEIGHTS",
        "click=1.0,conversion=2.0",
        doc="weights of the ranker heads in the combined score",
    )
    policies: str = env(
        "RECMESH_RANKING_POLICIES",
        "",
        doc="JSON file of per-tenant ranking policies (counts, rules, budgets); empty: none",
    )

    # Counts of the cascade (before the adaptive quality factor scales them).
    candidates_keep: int = env(
        "RECMESH_RANKING_CANDIDATES", 1000, doc="head of the candidate list considered at all"
    )
    prerank_keep: int = env("RECMESH_RANKING_PRERANK_KEEP", 200, doc="survivors of pre-rank")
    heavy_keep: int = env(
        "RECMESH_RANKING_HEAVY_KEEP", 50, doc="candidates the heavy ranker hands to re-rank"
    )

    # Stage budgets (the brief's defaults) and what is kept back for later stages.
    feature_budget_s: float = env(
        "RECMESH_RANKING_FEATURE_BUDGET_S", 0.010, doc="item feature read budget"
    )
    prerank_budget_s: float = env("RECMESH_RANKING_PRERANK_BUDGET_S", 0.005, doc="pre-rank budget")
    heavy_budget_s: float = env("RECMESH_RANKING_HEAVY_BUDGET_S", 0.025, doc="heavy ranker budget")
    rerank_budget_s: float = env("RECMESH_RANKING_RERANK_BUDGET_S", 0.005, doc="re-rank budget")
    reply_margin_s: float = env(
        "RECMESH_RANKING_REPLY_MARGIN_S",
        0.002,
        doc="time kept back from the request deadline to receive, encode and send the answer",
    )
    stage_reserve_s: float = env(
        "RECMESH_RANKING_STAGE_RESERVE_S",
        0.001,
        doc="time an earlier stage leaves for each later stage that cannot be skipped",
    )

    # Scoring within a budget (moving-average cost per candidate).
    heavy_chunk: int = env(
        "RECMESH_RANKING_HEAVY_CHUNK", 256, doc="most candidates per heavy ranker call"
    )
    heavy_probe: int = env(
        "RECMESH_RANKING_HEAVY_PROBE",
        32,
        doc="candidates of the first heavy call while the cost per candidate is unknown",
    )
    cost_safety: float = env(
        "RECMESH_RANKING_COST_SAFETY",
        0.9,
        doc="share of a stage budget planned with the estimated cost per candidate",
    )

    # Adaptive quality factor per stage.
    quality_target: float = env(
        "RECMESH_RANKING_QUALITY_TARGET",
        0.8,
        doc="target p95 of each stage, as a share of its default budget",
    )
    quality_min: float = env(
        "RECMESH_RANKING_QUALITY_MIN", 0.2, doc="lowest quality factor (share of the counts)"
    )
    quality_step: float = env(
        "RECMESH_RANKING_QUALITY_STEP", 0.05, doc="quality factor change per adjustment"
    )
    quality_window: int = env(
        "RECMESH_RANKING_QUALITY_WINDOW", 200, doc="recent stage timings the p95 is taken over"
    )
    quality_every: int = env(
        "RECMESH_RANKING_QUALITY_EVERY", 20, doc="stage timings between two adjustments"
    )

    # Re-rank.
    diversity: str = env(
        "RECMESH_RANKING_DIVERSITY", "mmr", doc="re-rank diversity: mmr, cap or none"
    )
    mmr_lambda: float = env(
        "RECMESH_RANKING_MMR_LAMBDA", 0.7, doc="MMR weight of relevance against diversity"
    )
    max_per_category: int = env(
        "RECMESH_RANKING_MAX_PER_CATEGORY", 3, doc="re-rank cap of items per category (cap mode)"
    )
    freshness_boost: float = env(
        "RECMESH_RANKING_FRESHNESS_BOOST", 0.0, doc="score added per unit of item freshness"
    )
    freshness_column: int = env(
        "RECMESH_RANKING_FRESHNESS_COLUMN",
        -1,
        doc="item feature column holding freshness (negative: from the end)",
    )
    ctr_weight: float = env(
        "RECMESH_RANKING_CTR_WEIGHT",
        0.1,
        doc="weight of the recent CTR lift in re-rank relevance (0: counters not read)",
    )
    """Re-rank adds ``ctr_weight * ln(smoothed recent CTR / prior CTR)`` to each pool item's
    rank-based relevance (``1 - rank / pool``; see :func:`services.ranking.rerank.ctr_lift`).

    Why 0.1: an item whose recent CTR is twice the prior gains 0.1 * ln 2 ≈ 0.07, about 3.5
    places in the 50-item pool, and one at four times the prior about 7; an item shown often
    and never clicked loses as much. So the counters of the last hours reorder the heavy
    ranker's top 50 by a few places where the evidence is strong, and cannot undo the
    trained model's order wholesale: items with few impressions keep a lift near 0 (the
    prior outweighs them). The same scale as ``freshness_boost`` (0.1 per standard
    deviation moves an item a tenth of the pool). Not zero: the real-time counters exist to
    act on the page."""
    counters_refresh_s: float = env(
        "RECMESH_RANKING_COUNTERS_REFRESH_S",
        0.5,
        doc="item counters this old are fetched again, in the background; at most one fetch "
        "per tenant per period (also its cap)",
    )
    counters_max_age_s: float = env(
        "RECMESH_RANKING_COUNTERS_MAX_AGE_S",
        10.0,
        doc="item counters older than this are not used (the feature service is failing)",
    )
    counters_entries: int = env(
        "RECMESH_RANKING_COUNTERS_ENTRIES",
        100_000,
        doc="items whose counters the process holds (least recently used evicted)",
    )
    ctr_prior_clicks: float = env(
        "RECMESH_RANKING_CTR_PRIOR_CLICKS",
        1.0,
        doc="clicks of the CTR smoothing prior (recent CTR = (clicks + a) / (impressions + b))",
    )
    ctr_prior_impressions: float = env(
        "RECMESH_RANKING_CTR_PRIOR_IMPRESSIONS",
        20.0,
        doc="impressions of the CTR smoothing prior (a / b is the CTR an unknown item is "
        "assumed to have: 5 %)",
    )
    explore_share: float = env(
        "RECMESH_RANKING_EXPLORE_SHARE",
        explore.DEFAULT_SHARE,
        doc="share of slots filled by exploration",
    )
    explore_pool: int = env(
        "RECMESH_RANKING_EXPLORE_POOL",
        explore.DEFAULT_POOL,
        doc="candidates after the chosen ones that exploration draws from",
    )
    cold_start_share: float = env(
        "RECMESH_RANKING_COLD_START_SHARE",
        0.2,
        doc="share of the exploration pool reserved for fresh candidates (the tenant's new "
        "catalog items, retrieval's fresh source): cold start, with exact propensities",
    )

    # Item rows.
    item_rows_from_set: bool = env(
        "RECMESH_RANKING_ITEM_ROWS_FROM_SET",
        True,
        doc="score the served set's items with the set's own rows, held in the process (rows "
        "written through the feature service are still read there); false: read every row "
        "through the feature service and the cache",
    )
    item_changes_refresh_s: float = env(
        "RECMESH_RANKING_ITEM_CHANGES_REFRESH_S",
        1.0,
        doc="how often the items written through the feature service are read again",
    )

    # Item feature cache (rows read through the feature service).
    item_cache_mb: float = env(
        "RECMESH_RANKING_ITEM_CACHE_MB", 64.0, doc="memory of the item feature cache (0: off)"
    )
    item_cache_ttl_s: float = env(
        "RECMESH_RANKING_ITEM_CACHE_TTL_S", 60.0, doc="seconds a cached item row stays fresh"
    )

    def __post_init__(self) -> None:
        if not 0 < self.counters_refresh_s <= self.counters_max_age_s:
            raise ConfigError(
                f"RECMESH_RANKING_COUNTERS_REFRESH_S={self.counters_refresh_s} must be above 0 "
                f"and at most RECMESH_RANKING_COUNTERS_MAX_AGE_S={self.counters_max_age_s}"
            )
        if not (self.ctr_prior_clicks > 0 and self.ctr_prior_impressions > 0):
            raise ConfigError(
                "RECMESH_RANKING_CTR_PRIOR_CLICKS and RECMESH_RANKING_CTR_PRIOR_IMPRESSIONS "
                f"must be above 0 (got {self.ctr_prior_clicks}, {self.ctr_prior_impressions})"
            )
