"""Settings of the projector."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ConfigError
from mesh.redis import SOCKET_TIMEOUT_S
from mesh.settings import (
    ServerSettings,
    counter_half_life_s,
    env,
    history_cap,
    metrics_port_of,
    port_of,
    projector_group,
    redis_url,
    tenants_file,
)

REDIS_SOCKET_TIMEOUT_MS = int(SOCKET_TIMEOUT_S * 1000)


@dataclass(frozen=True)
class ProjectorSettings(ServerSettings):
    """Environment of the projector process. Several replicas share one consumer group."""

    service_name: str = "projector"
    port: int = port_of("projector")
    metrics_port: int = metrics_port_of("projector")
    redis_url: str = redis_url()
    tenants: Path = tenants_file()
    group: str = projector_group()
    consumer: str = env(
        "RECMESH_PROJECTOR_CONSUMER",
        "",
        doc="this replica's name in the group, stable across its restarts and distinct "
        "from the other replicas' (default: the host name, a pod's name in Kubernetes)",
    )
    batch: int = env("RECMESH_PROJECTOR_BATCH", 200, doc="entries read per stream and round")
    block_ms: int = env(
        "RECMESH_PROJECTOR_BLOCK_MS", 100, doc="how long a read waits for new entries"
    )
    linger_ms: int = env(
        "RECMESH_PROJECTOR_LINGER_MS",
        50,
        doc="after a round of the event log that read less than a full batch, wait this "
        "long before the next read (fewer, larger rounds; projections up to this much later)",
    )
    claim_idle_s: float = env(
        "RECMESH_PROJECTOR_CLAIM_IDLE_S",
        30.0,
        doc="entries read but not acknowledged for this long (a crashed replica's) are claimed",
    )
    max_deliveries: int = env(
        "RECMESH_PROJECTOR_MAX_DELIVERIES",
        5,
        doc="an entry whose apply failed this many deliveries goes to the dead letters",
    )
    consumer_idle_s: float = env(
        "RECMESH_PROJECTOR_CONSUMER_IDLE_S",
        3600.0,
        doc="consumers with nothing pending idle this long (gone replicas) are deleted",
    )
    half_life_s: float = counter_half_life_s()
    applied_ttl_s: int = env(
        "RECMESH_PROJECTOR_APPLIED_TTL_S",
        7 * 24 * 3600,
        doc="how long an applied event id is remembered (redeliveries within it change nothing)",
    )
    history_cap: int = history_cap()
    retention_every_s: float = env(
        "RECMESH_PROJECTOR_RETENTION_EVERY_S",
        3600.0,
        doc="how often tenants with retention_days have their log trimmed behind a snapshot",
    )

    def __post_init__(self) -> None:
        if not 0 < self.block_ms < REDIS_SOCKET_TIMEOUT_MS:
            raise ConfigError(
                f"RECMESH_PROJECTOR_BLOCK_MS={self.block_ms} must be in 1.."
                f"{REDIS_SOCKET_TIMEOUT_MS - 1}: a longer blocking read outlasts the Redis "
                "client's socket timeout"
            )
