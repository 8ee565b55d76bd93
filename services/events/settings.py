"""Settings of the events service."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.settings import ServerSettings, env, metrics_port_of, port_of, redis_url


@dataclass(frozen=True)
class EventsSettings(ServerSettings):
    """Environment of the events service process."""

    service_name: str = "events"
    port: int = port_of("events")
    metrics_port: int = metrics_port_of("events")
    redis_url: str = redis_url()
    dedupe_ttl_s: int = env(
        "RECMESH_EVENTS_DEDUPE_TTL_S", 7 * 24 * 3600, doc="how long event ids are remembered"
    )
    max_read: int = env("RECMESH_EVENTS_MAX_READ", 1000, doc="most entries one Read returns")
