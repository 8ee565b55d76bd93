"""Settings of the ``recmesh`` tooling: where the default local mesh listens and what it uses.

The variables are the ones the mesh's processes read themselves (``RECMESH_<NAME>_PORT``,
``RECMESH_<NAME>_METRICS_PORT``, ``RECMESH_GATEWAY_HTTP_PORT``, ``REDIS_URL``,
``RECMESH_ARTIFACTS``, ``RECMESH_TENANTS``), so ``recmesh up`` and ``recmesh status`` agree
with a mesh started under the same environment;
:meth:`ops.supervisor.Layout.from_settings` turns them into a layout. ``RECMESH_JAEGER_URL``
is ``recmesh trace``'s own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.ports import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GATEWAY_HTTP_PORT
from mesh.settings import artifacts_dir, env, port_of, redis_url, tenants_file

_METRICS_DOC = "/metrics port of the service (0 picks a free one)"


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
    feature_metrics_port: int = env(
        "RECMESH_FEATURE_METRICS_PORT", DEFAULT_METRICS_PORTS["feature"], doc=_METRICS_DOC
    )
    retrieval_metrics_port: int = env(
        "RECMESH_RETRIEVAL_METRICS_PORT", DEFAULT_METRICS_PORTS["retrieval"], doc=_METRICS_DOC
    )
    ranking_metrics_port: int = env(
        "RECMESH_RANKING_METRICS_PORT", DEFAULT_METRICS_PORTS["ranking"], doc=_METRICS_DOC
    )
    experiment_metrics_port: int = env(
        "RECMESH_EXPERIMENT_METRICS_PORT", DEFAULT_METRICS_PORTS["experiment"], doc=_METRICS_DOC
    )
    events_metrics_port: int = env(
        "RECMESH_EVENTS_METRICS_PORT", DEFAULT_METRICS_PORTS["events"], doc=_METRICS_DOC
    )
    quota_metrics_port: int = env(
        "RECMESH_QUOTA_METRICS_PORT", DEFAULT_METRICS_PORTS["quota"], doc=_METRICS_DOC
    )
    http_port: int = env("RECMESH_GATEWAY_HTTP_PORT", GATEWAY_HTTP_PORT, doc="HTTP API port")
    redis_url: str = redis_url()
    artifacts: Path = artifacts_dir()
    tenants: Path = tenants_file()
    jaeger_url: str = env(
        "RECMESH_JAEGER_URL",
        "http://127.0.0.1:16686",
        doc="Jaeger's query service (UI and API) that `recmesh trace` asks",
    )

    def ports(self) -> dict[str, int]:
        """gRPC port of every process, by name (the keys of ``DEFAULT_PORTS``)."""
        return {name: int(getattr(self, f"{name}_port")) for name in DEFAULT_PORTS}

    def metrics_ports(self) -> dict[str, int]:
        """``/metrics`` port of every service, by name (the keys of ``DEFAULT_METRICS_PORTS``)."""
        return {name: int(getattr(self, f"{name}_metrics_port")) for name in DEFAULT_METRICS_PORTS}
