"""Settings of the feature service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.settings import (
    ServerSettings,
    artifacts_dir,
    env,
    history_cap,
    metrics_port_of,
    port_of,
    redis_url,
)


@dataclass(frozen=True)
class FeatureSettings(ServerSettings):
    """Environment of the feature service process."""

    service_name: str = "feature"
    port: int = port_of("feature")
    metrics_port: int = metrics_port_of("feature")
    redis_url: str = redis_url()
    artifacts: Path = artifacts_dir()
    history_limit: int = env(
        "RECMESH_FEATURE_HISTORY_LIMIT", 50, doc="history entries returned by default"
    )
    history_cap: int = history_cap()
    max_batch: int = env(
        "RECMESH_FEATURE_MAX_BATCH", 5000, doc="most items one GetItemFeatures call may ask for"
    )
