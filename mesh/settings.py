"""Typed settings read from the environment, with every name and default in one place.

A service declares one frozen dataclass whose fields are made with :func:`env`; the
field's metadata carries the variable name, so :func:`load` needs no other table::

    @dataclass(frozen=True)
    class FeatureSettings(ServerSettings):
        history_limit: int = env("RECMESH_FEATURE_HISTORY_LIMIT", 50)

    settings = load(FeatureSettings)

A value that does not parse fails fast with a :class:`~mesh.errors.ConfigError`
naming the variable.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from mesh.errors import ConfigError
from mesh.paths import ARTIFACTS_DIR, PROJECT_ROOT, VAR_DIR
from mesh.ports import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GATEWAY_HTTP_PORT

S = TypeVar("S")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env(name: str, default: Any, *, doc: str = "") -> Any:
    """A dataclass field read from environment variable ``name``, else ``default``."""
    return dataclasses.field(default=default, metadata={"env": name, "doc": doc})


def _parse(raw: str, kind: Any, name: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind is int:
            number = int(raw)
            if name.endswith("_PORT") and not 0 <= number <= 65535:
                raise ValueError("not a port (0..65535)")
            return number
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if kind is str:
            return raw
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is invalid: {exc}") from exc
    raise ConfigError(f"environment variable {name}: unsupported setting type {kind!r}")


def load(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
    """Build settings ``cls`` from ``environ`` (default: ``os.environ``).

    Raises:
        ConfigError: a variable is set to a value that does not parse as its field's type.
    """
    source = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = field.metadata.get("env")
        if name is not None and name in source:
            values[field.name] = _parse(source[name], hints[field.name], name)
    return cls(**values)


def describe(cls: type[Any]) -> list[tuple[str, str, str]]:
    """``(variable, default, doc)`` for every setting of ``cls``, for docs and ``--help``."""
    rows = []
    for field in dataclasses.fields(cls):
        if "env" in field.metadata:
            rows.append((field.metadata["env"], str(field.default), field.metadata["doc"]))
    return rows


def tls_enabled() -> Any:
    """The mTLS switch, env ``RECMESH_TLS`` (default on; ``off`` is for local debugging)."""
    return env(
        "RECMESH_TLS",
        True,
        doc="mutual TLS on every gRPC connection; `off` (plaintext) only for local debugging",
    )


def tls_dir() -> Any:
    """The directory of the CA and identity certificates, env ``RECMESH_TLS_DIR``."""
    return env(
        "RECMESH_TLS_DIR",
        VAR_DIR / "tls",
        doc="directory with ca.crt and <identity>.crt/.key (`recmesh up` issues them here)",
    )


def tls_identity() -> Any:
    """The identity a tool presents, env ``RECMESH_TLS_IDENTITY`` (a service presents its
    own name)."""
    return env(
        "RECMESH_TLS_IDENTITY",
        "ops",
        doc="identity whose certificate a tool (recmesh, load tests, chaos) presents",
    )


@dataclasses.dataclass(frozen=True)
class ToolTlsSettings:
    """How a process that serves nothing (a tool: ``recmesh``, the load tests, the chaos
    suite, ``training simulate``) speaks to the mesh."""

    tls: bool = tls_enabled()
    tls_dir: Path = tls_dir()
    tls_identity: str = tls_identity()


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every gRPC service process has: where it listens and how it drains."""

    service_name: str = "recmesh"
    host: str = env("RECMESH_HOST", "127.0.0.1", doc="interface to bind")
    port: int = 0
    metrics_port: int = -1
    """``/metrics`` on its own HTTP port (0 picks a free one); below 0 none (the gateway
    serves it on its HTTP API). Services set it with :func:`metrics_port_of`."""
    log_level: str = env("RECMESH_LOG_LEVEL", "INFO", doc="logging level")
    drain_grace_s: float = env(
        "RECMESH_DRAIN_GRACE_S", 5.0, doc="seconds in-flight calls get to finish on SIGTERM"
    )
    drain_delay_s: float = env(
        "RECMESH_DRAIN_DELAY_S",
        0.5,
        doc="seconds between NOT_SERVING and closing the port, so callers see the change",
    )
    max_concurrent_rpcs: int = env(
        "RECMESH_MAX_CONCURRENT_RPCS", 256, doc="calls in flight before new ones are refused"
    )
    max_receive_bytes: int = env(
        "RECMESH_MAX_RECEIVE_BYTES", 4 * 1024 * 1024, doc="largest request message accepted"
    )
    default_deadline_s: float = env(
        "RECMESH_DEFAULT_DEADLINE_S",
        1.0,
        doc="budget of a call whose caller sent no deadline (and cap of any deadline)",
    )
    faults_file: str = env(
        "RECMESH_FAULTS_FILE", "", doc="fault flags file watched for chaos runs (empty: none)"
    )
    health_interval_s: float = env(
        "RECMESH_HEALTH_INTERVAL_S", 1.0, doc="seconds between component health checks"
    )
    event_loop: str = env(
        "RECMESH_EVENT_LOOP",
        "uvloop",
        doc="event loop of the process: uvloop (libuv: cheaper socket I/O, timers and "
        "callbacks) or asyncio (the standard library's)",
    )
    tls: bool = tls_enabled()
    tls_dir: Path = tls_dir()
    """Holds ``ca.crt`` and this process's ``<service_name>.crt``/``.key``
    (:mod:`mesh.tls`)."""
    pipes: str = env(
        "RECMESH_PIPES",
        "retrieval,ranking,feature",
        doc="downstreams this process calls through a pipe (one stream carrying the calls, "
        "mesh.pipe) instead of one unary call each: comma-separated service names, empty "
        "for none",
    )
    health_port: int = env(
        "RECMESH_HEALTH_PORT",
        -1,
        doc="a plaintext port serving only grpc.health.v1, for probes that cannot present "
        "a certificate (the kubelet's gRPC probes); below 0 none",
    )

    def piped(self, downstream: str) -> bool:
        """Whether calls to ``downstream`` travel through a pipe (``pipes``)."""
        return downstream in {name.strip() for name in self.pipes.split(",")}


def downstream(service: str) -> Any:
    """A field holding the ``host:port`` of ``service``, env ``RECMESH_<SERVICE>_ADDR``."""
    return env(
        f"RECMESH_{service.upper()}_ADDR",
        f"127.0.0.1:{DEFAULT_PORTS[service]}",
        doc=f"address of the {service} service",
    )


def port_of(service: str) -> Any:
    """A field holding the port ``service`` listens on, env ``RECMESH_<SERVICE>_PORT``."""
    return env(
        f"RECMESH_{service.upper()}_PORT",
        DEFAULT_PORTS[service],
        doc=f"gRPC port of the {service} service (0 picks a free one)",
    )


def gateway_http_port() -> Any:
    """The gateway's HTTP API port field, env ``RECMESH_GATEWAY_HTTP_PORT``."""
    return env(
        "RECMESH_GATEWAY_HTTP_PORT",
        GATEWAY_HTTP_PORT,
        doc="HTTP API port of the gateway (0 picks a free one)",
    )


def metrics_port_of(service: str) -> Any:
    """A field holding ``service``'s ``/metrics`` port, env ``RECMESH_<SERVICE>_METRICS_PORT``,
    default from :data:`~mesh.ports.DEFAULT_METRICS_PORTS`."""
    return env(
        f"RECMESH_{service.upper()}_METRICS_PORT",
        DEFAULT_METRICS_PORTS[service],
        doc=f"Prometheus /metrics port of the {service} service (0 picks a free one)",
    )


def redis_url() -> Any:
    """The Redis URL field, env ``REDIS_URL``. Empty means none was given."""
    return env("REDIS_URL", "", doc="Redis URL; `make up` starts an embedded Valkey when unset")


def history_limit() -> Any:
    """The field of how many of a user's recent items a read of the user view returns
    (the feature service's default, and retrieval's own reads), env
    ``RECMESH_FEATURE_HISTORY_LIMIT``."""
    return env("RECMESH_FEATURE_HISTORY_LIMIT", 50, doc="history entries a user read returns")


def history_cap() -> Any:
    """The field of how many recent items a user's history keeps (the feature store's
    view, which the projector appends to), env ``RECMESH_FEATURE_HISTORY_CAP``."""
    return env("RECMESH_FEATURE_HISTORY_CAP", 200, doc="history entries kept per user")


COUNTER_HALF_LIFE_S = 3600.0
"""Default half-life of the item counters' decay, seconds (:func:`counter_half_life_s`)."""


def counter_half_life_s() -> Any:
    """The field of the half-life of the item counters' exponential decay, in seconds, env
    ``RECMESH_PROJECTOR_HALF_LIFE_S``: the projector decays the counters it writes with it,
    and the feature service decays them to the time of a read with the same one."""
    return env(
        "RECMESH_PROJECTOR_HALF_LIFE_S",
        COUNTER_HALF_LIFE_S,
        doc="half-life of the item counters' decay",
    )


def projector_group() -> Any:
    """The field of the consumer group the projector replicas read every tenant's log in,
    env ``RECMESH_PROJECTOR_GROUP``: the projector reads in it, and the events service's
    erasure reads its progress to know which events the live item counters hold."""
    return env(
        "RECMESH_PROJECTOR_GROUP",
        "projector",
        doc="consumer group every projector replica reads in",
    )


def artifacts_dir() -> Any:
    """The artifact root field; services load ``<root>/current``."""
    return env("RECMESH_ARTIFACTS", ARTIFACTS_DIR, doc="artifact root holding `current`")


def tenants_file() -> Any:
    """The tenant registry file field, env ``RECMESH_TENANTS``."""
    return env(
        "RECMESH_TENANTS",
        PROJECT_ROOT / "config" / "tenants.dev.json",
        doc="tenant registry (API key digests and quotas)",
    )


TENANTS_POLL_S = 0.5
"""Default seconds between two looks at the tenant file (:func:`tenants_poll_s`)."""


def tenants_poll_s() -> Any:
    """The field of how often a process that serves from the tenant registry (the gateway,
    the quota service) looks for a changed tenant file, env ``RECMESH_TENANTS_POLL_S``
    (``mesh.tenants.LiveRegistry``)."""
    return env(
        "RECMESH_TENANTS_POLL_S",
        TENANTS_POLL_S,
        doc="seconds between checks of the tenant file; a changed file (keys added, revoked "
        "or expired, rates) is served without a restart (0: read once at start)",
    )
