"""The whole mesh started in-process on free ports, for integration tests."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from gateway.assignments import AssignmentCache
from gateway.server import build_service as build_gateway
from gateway.settings import GatewaySettings
from mesh import redis as mesh_redis
from mesh.context import TENANT_KEY
from mesh.faults import write_flags
from mesh.http import HttpListener
from mesh.server import MeshServer
from mesh.testing import built_server, serving
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings
from services.experiment.server import build_service as build_experiment
from services.experiment.settings import ExperimentSettings
from services.feature.server import build_service as build_feature
from services.feature.settings import FeatureSettings
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from services.ranking.server import build_service as build_ranking
from services.ranking.settings import RankingSettings
from services.retrieval.server import build_service as build_retrieval
from services.retrieval.settings import RetrievalSettings

TENANTS = {
    "demo": ("demo-key", 1000, 2000),
    "acme": ("acme-key", 1000, 2000),
    "tiny": ("tiny-key", 0.5, 2),
}
"""Test tenants: name -> (API key, rate/s, burst). ``tiny`` exists to hit its quota."""

PROJECT = Path(__file__).resolve().parent.parent


def write_tenants(path: Path, extra: dict[str, tuple[str, float, int]] | None = None) -> Path:
    """Write the test tenant registry to ``path``: :data:`TENANTS` and ``extra`` (name ->
    (API key, rate/s, burst)), e.g. a tenant whose log only one module writes."""
    path.write_text(
        json.dumps(
            {
                "tenants": {
                    name: {
                        "api_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                        "rate": rate,
                        "burst": burst,
                    }
                    for name, (key, rate, burst) in {**TENANTS, **(extra or {})}.items()
                }
            }
        )
    )
    return path


@dataclass
class Mesh:
    servers: dict[str, MeshServer]
    http: HttpListener

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.servers[name].port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"


@asynccontextmanager
async def inprocess_mesh(
    redis_url: str,
    artifacts: Path,
    tenants_file: Path,
    faults_file: Path | None = None,
    assignments: AssignmentCache | None = None,
    experiments: Path | None = None,
    gateway_overrides: dict[str, Any] | None = None,
    gateway_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Mesh]:
    """Every service and the gateway, in this process, on port 0, features materialised.

    Budgets are generous: these tests check behaviour, not latency (that is `make bench`).

    With ``faults_file`` every server watches it for fault flags (see ``mesh.faults``).
    ``assignments`` replaces the gateway's cache of experiment assignments (the default one
    is sized by the gateway's default settings). ``experiments`` is the experiment book the
    experiment service and the gateway load (default: ``config/experiments.json``).
    ``gateway_clock`` is the wall clock of the gateway's HTTP API (event times are checked
    against it, its OpenAPI document states their window).
    """
    book = experiments or PROJECT / "config" / "experiments.json"
    async with AsyncExitStack() as stack:
        servers: dict[str, MeshServer] = {}

        async def start(name: str, server: MeshServer) -> str:
            servers[name] = await stack.enter_async_context(serving(server))
            return f"127.0.0.1:{servers[name].port}"

        # Plaintext: every service shares this one process (mesh.testing says where mTLS
        # and the identity rule are tested).
        common: dict[str, Any] = {
            "port": 0,
            "drain_delay_s": 0.0,
            "faults_file": str(faults_file or ""),
            "tls": False,
        }
        events = await start(
            "events",
            await built_server(build_events, EventsSettings(redis_url=redis_url, **common)),
        )
        feature = await start(
            "feature",
            await built_server(
                build_feature,
                FeatureSettings(
                    redis_url=redis_url, artifacts=artifacts, events_addr=events, **common
                ),
            ),
        )
        retrieval = await start(
            "retrieval",
            await built_server(
                build_retrieval,
                RetrievalSettings(
                    redis_url=redis_url,
                    artifacts=artifacts,
                    feature_addr=feature,
                    feature_budget_s=0.5,
                    **common,
                ),
            ),
        )
        ranking = await start(
            "ranking",
            await built_server(
                build_ranking,
                RankingSettings(
                    artifacts=artifacts, feature_addr=feature, feature_budget_s=0.5, **common
                ),
            ),
        )
        experiment = await start(
            "experiment",
            await built_server(
                build_experiment,
                ExperimentSettings(experiments=book, redis_url=redis_url, **common),
            ),
        )
        quota = await start(
            "quota",
            await built_server(
                build_quota, QuotaSettings(redis_url=redis_url, tenants=tenants_file, **common)
            ),
        )
        from mesh.client import open_channel
        from mesh.tenants import load_tenants

        channel = open_channel(feature)
        for tenant in load_tenants(tenants_file).tenants:
            await feature_pb2_grpc.FeatureServiceStub(channel).Materialize(
                feature_pb2.MaterializeRequest(), metadata=[(TENANT_KEY, tenant)], timeout=120
            )
        await channel.close()
        gateway_settings = GatewaySettings(
            http_port=0,
            outbox=tenants_file.parent / "outbox.db",
            tenants=tenants_file,
            experiments=book,
            feature_addr=feature,
            retrieval_addr=retrieval,
            ranking_addr=ranking,
            experiment_addr=experiment,
            events_addr=events,
            quota_addr=quota,
            deadline_s=2.0,
            # Every service shares this one loop: its lag is all of theirs, not the gateway's.
            admission_max_lag_s=0.0,
            retrieval_budget_s=1.0,
            ranking_budget_s=1.0,
            quota_budget_s=0.5,
            # One quota call per request, so a quota fault shows on the very next
            # request; leases have their own tests (tests/gateway/test_quota_leases.py).
            quota_lease_max=1,
            experiment_budget_s=0.5,
            **common,
            **(gateway_overrides or {}),
        )
        gateway = await build_gateway(
            gateway_settings, assignments=assignments, clock=gateway_clock
        )
        await start("gateway", MeshServer(gateway_settings, gateway))
        yield Mesh(servers, gateway.http)


async def accepted(
    mesh: Mesh, path: str, body: dict[str, Any], api_key: str = "demo-key"
) -> dict[str, Any]:
    """POST ``body`` as JSON to the gateway's HTTP API with ``api_key``; the JSON answer,
    after asserting it was accepted (200 or 202)."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(mesh.http_url + path, json=body, headers={"x-api-key": api_key}) as response,
    ):
        assert response.status in (200, 202), await response.text()
        reply: dict[str, Any] = await response.json()
        return reply


async def reset_quota(redis_url: str, tenant: str) -> None:
    """Refill ``tenant``'s bucket, so a quota test starts from a full burst."""

    client = mesh_redis.client(redis_url)
    await client.delete(f"rm:{{tenant:{tenant}}}:gcra")
    await client.aclose()


def set_faults(mesh: Mesh, path: Path, flags: dict[str, Any]) -> None:
    """Write the fault ``flags`` (``mesh.faults`` format) to ``path``, the faults file
    ``mesh`` was started with, and make every server of ``mesh`` read it now."""
    write_flags(path, flags)
    for server in mesh.servers.values():
        server.faults.reload()
