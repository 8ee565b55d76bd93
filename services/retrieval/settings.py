"""Settings of the retrieval service."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.settings import env, metrics_port_of, port_of
from services.runtime.model_service import ModelServingSettings


@dataclass(frozen=True)
class RetrievalSettings(ModelServingSettings):
    """Environment of the retrieval service process."""

    service_name: str = "retrieval"
    port: int = port_of("retrieval")
    metrics_port: int = metrics_port_of("retrieval")
    ann_k: int = env("RECMESH_RETRIEVAL_ANN_K", 500, doc="default ANN candidates")
    popular_k: int = env("RECMESH_RETRIEVAL_POPULAR_K", 100, doc="default popular candidates")
    max_k: int = env("RECMESH_RETRIEVAL_MAX_K", 2000, doc="largest ann_k or popular_k accepted")
    feature_budget_s: float = env(
        "RECMESH_RETRIEVAL_FEATURE_BUDGET_S", 0.010, doc="cap on the user feature read"
    )
