"""Settings of the ranking service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.settings import ServerSettings, artifacts_dir, downstream, env, port_of


@dataclass(frozen=True)
class RankingSettings(ServerSettings):
    """Environment of the ranking service process."""

    service_name: str = "ranking"
    port: int = port_of("ranking")
    artifacts: Path = artifacts_dir()
    feature_addr: str = downstream("feature")
    prerank_keep: int = env("RECMESH_RANKING_PRERANK_KEEP", 200, doc="survivors of pre-rank")
    max_candidates: int = env(
        "RECMESH_RANKING_MAX_CANDIDATES", 3000, doc="largest candidate list accepted"
    )
    max_items: int = env("RECMESH_RANKING_MAX_ITEMS", 500, doc="largest num_items accepted")
    head_weights: str = env(
        "RECMESH_RANKING_HEAD_WEIGHTS",
        "click=1.0,conversion=2.0",
        doc="weights of the ranker heads in the combined score",
    )
    max_per_category: int = env(
        "RECMESH_RANKING_MAX_PER_CATEGORY", 3, doc="re-rank cap of items per category"
    )
    feature_budget_s: float = env(
        "RECMESH_RANKING_FEATURE_BUDGET_S", 0.010, doc="cap on the item feature read"
    )
