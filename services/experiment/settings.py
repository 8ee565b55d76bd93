"""Settings of the experiment service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.experiments.book import experiments_file
from mesh.settings import ServerSettings, env, metrics_port_of, port_of, redis_url


@dataclass(frozen=True)
class ExperimentSettings(ServerSettings):
    """Environment of the experiment service process."""

    service_name: str = "experiment"
    port: int = port_of("experiment")
    metrics_port: int = metrics_port_of("experiment")
    experiments: Path = experiments_file()
    redis_url: str = redis_url()
    """Where the event logs are, for reports; assignment never reads it (empty: no reports)."""
    report_page: int = env(
        "RECMESH_EXPERIMENT_REPORT_PAGE",
        5000,
        doc="log entries a report reads per XRANGE",
    )
