"""Settings of the quota service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.settings import (
    ServerSettings,
    env,
    metrics_port_of,
    port_of,
    redis_url,
    tenants_file,
    tenants_poll_s,
)


@dataclass(frozen=True)
class QuotaSettings(ServerSettings):
    """Environment of the quota service process."""

    service_name: str = "quota"
    port: int = port_of("quota")
    metrics_port: int = metrics_port_of("quota")
    redis_url: str = redis_url()
    tenants: Path = tenants_file()
    tenants_poll_s: float = tenants_poll_s()
    rls_domain: str = env(
        "RECMESH_QUOTA_RLS_DOMAIN", "recmesh", doc="Envoy rate-limit domain this service answers"
    )
