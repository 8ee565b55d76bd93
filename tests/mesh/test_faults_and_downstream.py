"""Fault flags on a real server, seen through the guarded client (`mesh.client.Downstream`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from mesh.client import CallPolicy, Downstream
from mesh.context import Budget, budget_var, tenant_var
from mesh.resilience import CircuitOpen
from mesh.testing import built_server, serving
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

PROJECT = Path(__file__).resolve().parents[2]


def flags(path: Path, faults: dict[str, object]) -> None:
    path.write_text(json.dumps({"experiment": faults}))


async def call_once(ds: Downstream[experiment_pb2_grpc.ExperimentServiceAsyncStub]) -> str:
    budget_var.set(Budget(0.5))
    tenant_var.set("demo")
    try:
        await ds.call(
            ds.stub.Assign, experiment_pb2.AssignRequest(user_id="u1"), cap_s=0.2, idempotent=True
        )
    except CircuitOpen:
        return "rejected"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def test_half_unavailable_caps_retries_and_opens_the_breaker(tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    flags(faults, {"Assign": {"error_rate": 0.5, "code": "UNAVAILABLE"}})
    server = await built_server(
        build_service,
        ExperimentSettings(
            port=0,
            experiments=PROJECT / "config" / "experiments.json",
            faults_file=str(faults),
        ),
    )
    async with serving(server):
        ds = Downstream.open(
            "experiment",
            f"127.0.0.1:{server.port}",
            experiment_pb2_grpc.ExperimentServiceStub,
            policy=CallPolicy(min_calls=40, fail_max=50, reset_timeout_s=60.0),
        )
        results = [await call_once(ds) for _ in range(120)]
        await ds.close()
    sent = [r for r in results if r != "rejected"]
    assert ds.breaker.state == "open"
    assert results[-1] == "rejected"
    assert 0 < results.count("OK") < len(sent)
    requests, retries = ds.retry_budget.counts()
    assert requests == 120
    assert 0 < retries <= 0.2 * requests + 3


async def test_latency_flag_makes_calls_miss_their_deadline(tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    server = await built_server(
        build_service,
        ExperimentSettings(
            port=0,
            experiments=PROJECT / "config" / "experiments.json",
            faults_file=str(faults),
        ),
    )
    async with serving(server):
        ds = Downstream.open(
            "experiment", f"127.0.0.1:{server.port}", experiment_pb2_grpc.ExperimentServiceStub
        )
        assert await call_once(ds) == "OK"
        flags(faults, {"*": {"latency_ms": 400}})
        server.faults.reload()
        budget_var.set(Budget(0.05))
        tenant_var.set("demo")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ds.call(ds.stub.Assign, experiment_pb2.AssignRequest(user_id="u1"), cap_s=1.0)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        faults.unlink()
        server.faults.reload()
        await asyncio.sleep(0)
        assert await call_once(ds) == "OK"
        await ds.close()
