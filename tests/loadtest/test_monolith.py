"""The monolith baseline runs the real funnel in one process: same answers' shape, real
quota, real event log, and in-process calls that fail like remote ones."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from recmesh.experiment.v1 import experiment_pb2
from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.settings import GatewaySettings
from loadtest.monolith import build_monolith
from mesh.client import Downstream
from mesh.context import Budget, budget_var, tenant_var
from mesh.errors import InvalidArgument
from mesh.local import local_stub
from mesh.settings import load
from mesh.testing import built_server, serving
from tests.inprocess import PROJECT, reset_quota, write_tenants


async def test_the_monolith_answers_the_funnel_and_enforces_quota(
    redis_url: str, artifacts_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = {
        "REDIS_URL": redis_url,
        "RECMESH_ARTIFACTS": str(artifacts_root),
        "RECMESH_TENANTS": str(write_tenants(tmp_path / "tenants.json")),
        "RECMESH_EXPERIMENTS": str(PROJECT / "config" / "experiments.json"),
        "RECMESH_GATEWAY_PORT": "0",
        "RECMESH_GATEWAY_HTTP_PORT": "0",
        "RECMESH_GATEWAY_OUTBOX": str(tmp_path / "outbox.db"),
        "RECMESH_DRAIN_DELAY_S": "0",
        # Behaviour, not latency: budgets nothing in a test run can miss.
        "RECMESH_GATEWAY_DEADLINE_S": "5",
        "RECMESH_GATEWAY_QUOTA_BUDGET_S": "1",
        "RECMESH_GATEWAY_EXPERIMENT_BUDGET_S": "1",
        "RECMESH_GATEWAY_RETRIEVAL_BUDGET_S": "2",
        "RECMESH_GATEWAY_RANKING_BUDGET_S": "2",
        "RECMESH_RETRIEVAL_FEATURE_BUDGET_S": "0.5",
        "RECMESH_RANKING_FEATURE_BUDGET_S": "0.5",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    server = await built_server(build_monolith, load(GatewaySettings))
    async with serving(server):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply = await stub.Recommend(
            gateway_pb2.RecommendRequest(user_id="u3", num_items=7),
            metadata=(("x-api-key", "demo-key"),),
            timeout=5,
        )
        assert len(reply.items) == 7
        assert len({item.item_id for item in reply.items}) == 7
        assert list(reply.degraded) == []

        await reset_quota(redis_url, "tiny")  # other tests of the session use its bucket
        codes = []
        for _ in range(4):  # tenant "tiny": burst 2, 0.5 requests/s
            try:
                await stub.Recommend(
                    gateway_pb2.RecommendRequest(user_id="u3", num_items=3),
                    metadata=(("x-api-key", "tiny-key"),),
                    timeout=5,
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        assert codes[:2] == [grpc.StatusCode.OK] * 2
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[2:]
        await channel.close()


class _Servicer:
    async def Assign(self, request: experiment_pb2.AssignRequest, context: object) -> object:
        if not request.user_id:
            raise InvalidArgument("user_id is required", field="user_id")
        budget = budget_var.get()
        assert budget is not None
        return experiment_pb2.AssignResponse(
            assignments=[experiment_pb2.Assignment(experiment_key=f"{budget.remaining():.3f}")]
        )


async def test_in_process_calls_get_the_capped_budget_and_fail_with_the_status_code() -> None:
    downstream: Downstream[object] = Downstream("experiment", local_stub(_Servicer()))
    stub = downstream.stub
    tenant_var.set("demo")
    outer = Budget(0.5)
    budget_var.set(outer)
    reply = await downstream.call(
        stub.Assign,  # type: ignore[attr-defined]
        experiment_pb2.AssignRequest(user_id="u1"),
        cap_s=0.05,
    )
    assert 0.0 < float(reply.assignments[0].experiment_key) <= 0.05
    assert budget_var.get() is outer  # the handler's budget did not leak back

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await downstream.call(
            stub.Assign,  # type: ignore[attr-defined]
            experiment_pb2.AssignRequest(),
            cap_s=0.05,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in (error.value.details() or "")
