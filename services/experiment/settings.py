"""Settings of the experiment service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.paths import CONFIG_DIR
from mesh.settings import ServerSettings, env, port_of


def experiments_file() -> Path:
    """The experiment book field, env ``RECMESH_EXPERIMENTS`` (read by the gateway too)."""
    value: Path = env(
        "RECMESH_EXPERIMENTS",
        CONFIG_DIR / "experiments.json",
        doc="experiment book (JSON) to assign from",
    )
    return value


@dataclass(frozen=True)
class ExperimentSettings(ServerSettings):
    """Environment of the experiment service process."""

    service_name: str = "experiment"
    port: int = port_of("experiment")
    experiments: Path = experiments_file()
