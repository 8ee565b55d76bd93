"""Settings of the retrieval service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.settings import ServerSettings, artifacts_dir, downstream, env, port_of


@dataclass(frozen=True)
class RetrievalSettings(ServerSettings):
    """Environment of the retrieval service process."""

    service_name: str = "retrieval"
    port: int = port_of("retrieval")
    artifacts: Path = artifacts_dir()
    feature_addr: str = downstream("feature")
    ann_k: int = env("RECMESH_RETRIEVAL_ANN_K", 500, doc="default ANN candidates")
    popular_k: int = env("RECMESH_RETRIEVAL_POPULAR_K", 100, doc="default popular candidates")
    max_k: int = env("RECMESH_RETRIEVAL_MAX_K", 2000, doc="largest ann_k or popular_k accepted")
    feature_budget_s: float = env(
        "RECMESH_RETRIEVAL_FEATURE_BUDGET_S", 0.010, doc="cap on the user feature read"
    )
