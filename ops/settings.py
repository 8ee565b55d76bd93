"""Settings of the ``recmesh`` tooling: where the default local mesh listens and what it uses.

The variables are the ones the mesh's processes read themselves (``RECMESH_<NAME>_PORT``,
``RECMESH_<NAME>_METRICS_PORT``, ``RECMESH_GATEWAY_HTTP_PORT``, ``REDIS_URL``,
``RECMESH_ARTIFACTS``, ``RECMESH_TENANTS``, ``RECMESH_EXPERIMENTS``), so ``recmesh up`` and
``recmesh status`` agree with a mesh started under the same environment;
:meth:`ops.supervisor.Layout.from_settings` turns them into a layout. ``RECMESH_JAEGER_URL``
is ``recmesh trace``'s own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.experiments.book import experiments_file
from mesh.ports import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from mesh.settings import (
    artifacts_dir,
    counter_half_life_s,
    env,
    gateway_http_port,
    metrics_port_of,
    port_of,
    projector_group,
    redis_url,
    tenants_file,
    tls_dir,
    tls_enabled,
    tls_identity,
)
from mesh.settings import history_cap as history_cap_field
from mesh.tls import Transport


@dataclass(frozen=True)
class OpsSettings:
    """Environment of ``recmesh`` (and of the tools that start the default mesh)."""

    gateway_port: int = port_of("gateway")
    feature_port: int = port_of("feature")
    retrieval_port: int = port_of("retrieval")
    ranking_port: int = port_of("ranking")
    experiment_port: int = port_of("experiment")
    events_port: int = port_of("events")
    quota_port: int = port_of("quota")
    projector_port: int = port_of("projector")
    feature_metrics_port: int = metrics_port_of("feature")
    retrieval_metrics_port: int = metrics_port_of("retrieval")
    ranking_metrics_port: int = metrics_port_of("ranking")
    experiment_metrics_port: int = metrics_port_of("experiment")
    events_metrics_port: int = metrics_port_of("events")
    quota_metrics_port: int = metrics_port_of("quota")
    projector_metrics_port: int = metrics_port_of("projector")
    http_port: int = gateway_http_port()
    redis_url: str = redis_url()
    artifacts: Path = artifacts_dir()
    tenants: Path = tenants_file()
    experiments: Path = experiments_file()
    """The experiment book (``recmesh experiments report`` finds an experiment's tenants)."""
    half_life_s: float = counter_half_life_s()
    """The projector's counter half-life (``recmesh projections`` recomputes with it)."""
    history_cap: int = history_cap_field()
    projector_group: str = projector_group()
    tls: bool = tls_enabled()
    tls_dir: Path = tls_dir()
    tls_identity: str = tls_identity()
    """The identity ``recmesh`` presents to the mesh (``ops``: the tools' own)."""
    jaeger_url: str = env(
        "RECMESH_JAEGER_URL",
        "http://127.0.0.1:16686",
        doc="Jaeger's query service (UI and API) that `recmesh trace` asks",
    )

    def transport(self) -> Transport:
        """How ``recmesh`` reaches the mesh: mTLS as ``tls_identity``, or plaintext.

        Raises:
            ConfigError: TLS is on and the certificates are not issued (``recmesh certs``).
        """
        return Transport.load(self.tls, self.tls_dir, self.tls_identity)

    def ports(self) -> dict[str, int]:
        """gRPC port of every process, by name (the keys of ``DEFAULT_PORTS``)."""
        return {name: int(getattr(self, f"{name}_port")) for name in DEFAULT_PORTS}

    def metrics_ports(self) -> dict[str, int]:
        """``/metrics`` port of every service, by name (the keys of ``DEFAULT_METRICS_PORTS``)."""
        return {name: int(getattr(self, f"{name}_metrics_port")) for name in DEFAULT_METRICS_PORTS}
