"""``recmesh usage``: the command against a real quota service and Valkey."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.server import MeshServer
from mesh.testing import built_server, channel_to, serving
from ops import cli
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from tests.inprocess import write_tenants


@pytest.fixture(scope="module")
async def quota_server(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MeshServer]:
    tenants = write_tenants(tmp_path_factory.mktemp("usage-cli") / "tenants.json")
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=tenants)
    )
    async with serving(server):
        yield server


async def test_usage_prints_each_tenants_costs(
    quota_server: MeshServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RECMESH_QUOTA_PORT", str(quota_server.port))
    monkeypatch.setenv("RECMESH_TLS", "off")  # an in-process server: plaintext
    code = await asyncio.to_thread(cli.main, ["usage", "--json"])
    before = {row["tenant"]: row for row in json.loads(capsys.readouterr().out)["usage"]}
    assert code == 0 and set(before) == {"demo", "acme", "tiny"}
    async with channel_to(quota_server) as channel:
        await quota_pb2_grpc.QuotaServiceStub(channel).RecordUsage(
            quota_pb2.RecordUsageRequest(
                batch_id=uuid.uuid4().hex,
                costs=[
                    quota_pb2.TenantCost(
                        tenant="acme",
                        requests=4,
                        cpu_us={"retrieval": 2000, "ranking": 6000},
                        candidates_scored={"prerank": 800, "heavy": 200},
                    )
                ],
            )
        )

    code = await asyncio.to_thread(cli.main, ["usage", "--tenant", "acme", "--json"])
    [acme] = json.loads(capsys.readouterr().out)["usage"]
    assert code == 0
    assert acme["costed_requests"] - before["acme"]["costed_requests"] == 4
    assert acme["candidates_scored"] - before["acme"]["candidates_scored"] == 1000
    assert acme["ranking_cpu_ms"] - before["acme"]["ranking_cpu_ms"] == pytest.approx(6.0)
    assert acme["cpu_ms_per_request"] > 0

    code = await asyncio.to_thread(cli.main, ["usage"])
    text = capsys.readouterr().out
    assert code == 0 and "ranking CPU ms" in text and "acme: candidates scored by stage" in text


async def test_usage_exits_1_for_a_tenant_the_quota_service_does_not_know(
    quota_server: MeshServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RECMESH_QUOTA_PORT", str(quota_server.port))
    monkeypatch.setenv("RECMESH_TLS", "off")
    code = await asyncio.to_thread(cli.main, ["usage", "--tenant", "nobody"])
    assert code == 1 and "NOT_FOUND" in capsys.readouterr().out
