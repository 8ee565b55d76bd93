"""Settings of the retrieval service."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import ConfigError
from mesh.settings import env, history_limit, metrics_port_of, port_of, redis_url
from services.runtime.model_service import ModelServingSettings

MAX_TRENDING_LIST = 5000
"""Most trending items a list may keep: the feature service's default batch limit
(``RECMESH_FEATURE_MAX_BATCH``), the most one ``GetTrendingItems`` answers."""


@dataclass(frozen=True)
class RetrievalSettings(ModelServingSettings):
    """Environment of the retrieval service process."""

    service_name: str = "retrieval"
    port: int = port_of("retrieval")
    metrics_port: int = metrics_port_of("retrieval")
    ann_k: int = env("RECMESH_RETRIEVAL_ANN_K", 500, doc="default ANN candidates")
    popular_k: int = env("RECMESH_RETRIEVAL_POPULAR_K", 100, doc="default popular candidates")
    trending_k: int = env("RECMESH_RETRIEVAL_TRENDING_K", 50, doc="default trending candidates")
    max_k: int = env(
        "RECMESH_RETRIEVAL_MAX_K", 2000, doc="largest ann_k, popular_k or trending_k accepted"
    )
    redis_url: str = redis_url()
    """The online feature store, which retrieval reads a request's user from
    (:mod:`services.runtime.user_view`)."""
    history_limit: int = history_limit()
    feature_budget_s: float = env(
        "RECMESH_RETRIEVAL_FEATURE_BUDGET_S",
        0.010,
        doc="cap on the user feature read, and on a request's wait for a trending list when "
        "it has none to serve",
    )
    trending_list: int = env(
        "RECMESH_RETRIEVAL_TRENDING_LIST",
        200,
        doc="trending items kept per tenant (a request takes trending_k plus the ones it has "
        "seen; trending_k beyond this gets this many)",
    )
    trending_min_clicks: float = env(
        "RECMESH_RETRIEVAL_TRENDING_MIN_CLICKS",
        0.1,
        doc="items with fewer clicks decayed to now are not trending (0.1: one click stays "
        "trending for 3.3 half-lives)",
    )
    trending_refresh_s: float = env(
        "RECMESH_RETRIEVAL_TRENDING_REFRESH_S",
        0.5,
        doc="a tenant's trending list this old is refreshed in the background (at most one "
        "call per tenant per period); also the cap of that call",
    )
    trending_max_age_s: float = env(
        "RECMESH_RETRIEVAL_TRENDING_MAX_AGE_S",
        2.0,
        doc="a trending list older than this is not served: a request finding it older waits "
        "for the refresh (up to the feature budget), and while refreshes fail it gets none",
    )
    fresh_k: int = env(
        "RECMESH_RETRIEVAL_FRESH_K",
        20,
        doc="default fresh candidates: the tenant's newest own catalog items, for cold start",
    )
    catalog_refresh_s: float = env(
        "RECMESH_RETRIEVAL_CATALOG_REFRESH_S",
        0.2,
        doc="a tenant's live catalog this old is refreshed from the item changes (at most one "
        "call per tenant per period); also the cap of each call",
    )
    catalog_max_age_s: float = env(
        "RECMESH_RETRIEVAL_CATALOG_MAX_AGE_S",
        0.5,
        doc="a request finding its tenant's catalog older than this waits for the refresh (up "
        "to the feature budget) and, still older, names catalog in degraded",
    )

    def __post_init__(self) -> None:
        if not 0 < self.catalog_refresh_s <= self.catalog_max_age_s:
            raise ConfigError(
                f"RECMESH_RETRIEVAL_CATALOG_REFRESH_S={self.catalog_refresh_s} must be above "
                f"0 and at most RECMESH_RETRIEVAL_CATALOG_MAX_AGE_S={self.catalog_max_age_s}"
            )
        if not 0 < self.trending_refresh_s <= self.trending_max_age_s:
            raise ConfigError(
                f"RECMESH_RETRIEVAL_TRENDING_REFRESH_S={self.trending_refresh_s} must be above "
                f"0 and at most RECMESH_RETRIEVAL_TRENDING_MAX_AGE_S={self.trending_max_age_s}"
            )
        if not 0 < self.trending_list <= MAX_TRENDING_LIST:
            raise ConfigError(
                f"RECMESH_RETRIEVAL_TRENDING_LIST={self.trending_list} must be in "
                f"1..{MAX_TRENDING_LIST}"
            )
        if not 0.0 <= self.trending_min_clicks < math.inf:
            raise ConfigError(
                f"RECMESH_RETRIEVAL_TRENDING_MIN_CLICKS={self.trending_min_clicks} must be a "
                "finite number >= 0"
            )
