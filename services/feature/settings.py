"""Settings of the feature service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.settings import (
    ServerSettings,
    artifacts_dir,
    counter_half_life_s,
    downstream,
    env,
    history_cap,
    history_limit,
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
    history_limit: int = history_limit()
    history_cap: int = history_cap()
    half_life_s: float = counter_half_life_s()
    """The projector's decay of the item counters, which reads decay to the time of the read."""
    max_batch: int = env(
        "RECMESH_FEATURE_MAX_BATCH", 5000, doc="most items one GetItemFeatures call may ask for"
    )
    events_addr: str = downstream("events")
    """The events service, read by as-of requests only (the live path never calls it)."""
    events_budget_s: float = env(
        "RECMESH_FEATURE_EVENTS_BUDGET_S",
        1.0,
        doc="cap on one page of a user's events read for an as-of request",
    )
    events_page: int = env(
        "RECMESH_FEATURE_EVENTS_PAGE",
        1000,
        doc="events asked for per page of an as-of read (at most the events service's "
        "RECMESH_EVENTS_MAX_READ)",
    )
