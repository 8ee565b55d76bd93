"""The one wiring of a model-serving service (retrieval, ranking): the served set, the
feature service it reads, the watcher that hot-swaps the set, and their lifecycle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeAlias

from recmesh.feature.v1 import feature_pb2_grpc

from mesh.client import Downstream
from mesh.service import Registration, Service
from mesh.settings import ServerSettings, artifacts_dir, downstream, env
from mesh.tls import Transport
from services.runtime.artifact_watch import ArtifactWatcher, M
from services.runtime.models import artifacts_check

FeatureClient: TypeAlias = "Downstream[feature_pb2_grpc.FeatureServiceAsyncStub]"
"""The guarded client of the feature service that retrieval and ranking read through."""


@dataclass(frozen=True)
class ModelServingSettings(ServerSettings):
    """What every model-serving service reads: where the artifact sets are, how often to
    look for a new one, and the feature service."""

    artifacts: Path = artifacts_dir()
    artifact_poll_s: float = env(
        "RECMESH_ARTIFACT_POLL_S",
        2.0,
        doc="seconds between checks of <artifacts>/current for a new set (0 turns hot swap off)",
    )
    feature_addr: str = downstream("feature")


class ServesModels(Protocol[M]):
    """A servicer that reads its models from one attribute, once per request."""

    models: M


@dataclass(kw_only=True)
class ModelService(Service, Generic[M]):
    """A :class:`~mesh.service.Service` that serves an artifact set; ``watcher`` swaps it."""

    watcher: ArtifactWatcher[M]


def feature_client(settings: ModelServingSettings) -> FeatureClient:
    """The feature service at ``settings.feature_addr``, behind the mesh's guards, over the
    service's transport (:meth:`mesh.tls.Transport.of`)."""
    return Downstream.open(
        "feature",
        settings.feature_addr,
        feature_pb2_grpc.FeatureServiceStub,
        transport=Transport.of(settings),
        pipe=settings.piped("feature"),
    )


def model_service(
    settings: ModelServingSettings,
    registration: Registration,
    models: M,
    load: Callable[[Path, M], M],
    features: Downstream[Any],
) -> ModelService[M]:
    """The service mounting ``registration``, serving ``models`` and swapping in each new
    ``<artifacts>/current`` that ``load(path, served)`` accepts (see
    :mod:`services.runtime.artifact_watch`).

    ``registration.servicer`` must read its models from its ``models`` attribute: the swap
    is one assignment of it. Healthy while the served set is on disk; ``features`` is
    connected at start-up and closed at clean-up.
    """
    servicer: ServesModels[M] = registration.servicer

    def install(candidate: M) -> None:
        servicer.models = candidate

    watcher = ArtifactWatcher(
        service=settings.service_name,
        root=settings.artifacts,
        served=models,
        load=load,
        install=install,
        poll_s=settings.artifact_poll_s,
    )
    return ModelService(
        registrations=[registration],
        checks=[artifacts_check(lambda: watcher.served.path)],
        startups=[features.connect, watcher.start],
        cleanups=[watcher.stop, features.close],
        watcher=watcher,
    )
