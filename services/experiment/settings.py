"""Settings of the experiment service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.experiments.book import experiments_file
from mesh.settings import ServerSettings, metrics_port_of, port_of


@dataclass(frozen=True)
class ExperimentSettings(ServerSettings):
    """Environment of the experiment service process."""

    service_name: str = "experiment"
    port: int = port_of("experiment")
    metrics_port: int = metrics_port_of("experiment")
    experiments: Path = experiments_file()
