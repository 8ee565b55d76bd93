"""Settings of the events service."""

from __future__ import annotations

from dataclasses import dataclass

from core.events import MAX_AGE_MS, MAX_FUTURE_MS
from mesh.errors import ConfigError
from mesh.settings import (
    ServerSettings,
    counter_half_life_s,
    env,
    metrics_port_of,
    port_of,
    projector_group,
    redis_url,
)


@dataclass(frozen=True)
class EventsSettings(ServerSettings):
    """Environment of the events service process."""

    service_name: str = "events"
    port: int = port_of("events")
    metrics_port: int = metrics_port_of("events")
    redis_url: str = redis_url()
    dedupe_ttl_s: int = env(
        "RECMESH_EVENTS_DEDUPE_TTL_S",
        (MAX_AGE_MS + MAX_FUTURE_MS) // 1000,
        doc="how long event ids are remembered (at least the oldest plus the furthest-ahead "
        "event time the gateway accepts: 8 days)",
    )
    max_read: int = env("RECMESH_EVENTS_MAX_READ", 1000, doc="most entries one Read returns")

    def __post_init__(self) -> None:
        if self.dedupe_ttl_s * 1000 < MAX_AGE_MS + MAX_FUTURE_MS:
            raise ConfigError(
                f"RECMESH_EVENTS_DEDUPE_TTL_S={self.dedupe_ttl_s} must be at least "
                f"{(MAX_AGE_MS + MAX_FUTURE_MS) // 1000}: the gateway accepts event times from "
                "7 days back to 1 day ahead, and a retry of one must still find its id"
            )

    half_life_s: float = counter_half_life_s()
    """The projector's half-life: an erasure recomputes item counters with it."""
    projector_group: str = projector_group()
    """The projector's consumer group: an erasure reads its progress to know which events
    the live item counters hold."""
