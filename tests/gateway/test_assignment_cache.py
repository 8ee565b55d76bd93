"""The gateway asks the experiment service only when its cache holds no fresh answer.

The whole mesh runs in-process; the gateway's assignment cache runs on a clock the tests
move. Calls are counted where they are answered: the experiment server's own
``recmesh_rpc_server_handled_total``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from core.experiments.assign import assign
from core.experiments.book import load_experiments
from gateway.assignments import AssignmentCache
from mesh.testing import ManualClock
from tests.inprocess import PROJECT, Mesh, inprocess_mesh, set_faults, write_tenants

DEMO = {"x-api-key": "demo-key"}
TTL_S = 30.0
EXPERIMENT = "recmesh.experiment.v1.ExperimentService"


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
async def cached(
    redis_url: str,
    artifacts_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    clock: ManualClock,
) -> AsyncIterator[tuple[Mesh, Path]]:
    base = tmp_path_factory.mktemp("assignment-cache")
    faults = base / "faults.json"
    async with inprocess_mesh(
        redis_url,
        artifacts_root,
        write_tenants(base / "tenants.json"),
        faults,
        assignments=AssignmentCache(1000, TTL_S, clock=clock),
    ) as mesh:
        yield mesh, faults


def assign_calls() -> float:
    """``Assign`` calls the experiment server answered so far, whatever their status."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "recmesh_rpc_server_handled"
        for sample in metric.samples
        if sample.name.endswith("_total")
        and sample.labels["grpc_service"] == EXPERIMENT
        and sample.labels["grpc_method"] == "Assign"
    )


def treated_user(prefix: str) -> str:
    """The first ``<prefix><n>`` of tenant demo bucketed into a variant other than control,
    so that its assignment cannot be mistaken for the fallback's."""
    book = load_experiments(PROJECT / "config" / "experiments.json")
    for n in range(1000):
        user = f"{prefix}{n}"
        found = assign(book, tenant="demo", attributes={"user_id": user})
        if any(a.variant_index > 0 for a in found):
            return user
    raise AssertionError(f"no treated user among {prefix}0..999")


async def recommend(mesh: Mesh, user: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mesh.http_url + "/v1/recommend", json={"user_id": user, "num_items": 5}, headers=DEMO
        ) as response,
    ):
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body


async def test_a_cached_assignment_saves_the_call_until_the_ttl(
    cached: tuple[Mesh, Path], clock: ManualClock
) -> None:
    mesh, _ = cached
    user = treated_user("ttl-")
    before = assign_calls()
    hits = REGISTRY.get_sample_value("recmesh_gateway_assignment_cache_total", {"result": "hit"})
    first = await recommend(mesh, user)
    assert assign_calls() - before == 1
    clock.now += TTL_S
    second = await recommend(mesh, user)
    assert assign_calls() - before == 1
    assert second["experiments"] == first["experiments"]
    counted = REGISTRY.get_sample_value("recmesh_gateway_assignment_cache_total", {"result": "hit"})
    assert (counted or 0.0) - (hits or 0.0) == 1
    assert "experiment" not in first["degraded"] + second["degraded"]
    clock.now += 0.001
    third = await recommend(mesh, user)
    assert assign_calls() - before == 2
    assert third["experiments"] == first["experiments"]


async def test_a_cached_assignment_is_served_while_the_service_is_down(
    cached: tuple[Mesh, Path],
) -> None:
    mesh, faults = cached
    known, unknown = treated_user("known-"), treated_user("unknown-")
    answered = await recommend(mesh, known)
    set_faults(mesh, faults, {"experiment": {"*": {"error_rate": 1.0, "code": "UNAVAILABLE"}}})
    try:
        hit = await recommend(mesh, known)
        before = assign_calls()
        missed = await recommend(mesh, unknown)
        assert assign_calls() > before  # the miss did ask, and failed
    finally:
        set_faults(mesh, faults, {})
    assert hit["experiments"] == answered["experiments"]
    assert "experiment" not in hit["degraded"]
    assert "experiment" in missed["degraded"]
    assert missed["experiments"]
    assert {e["variant"] for e in missed["experiments"]} == {"control"}
    # Neither the failure nor the control variants were cached: the next request asks again.
    before = assign_calls()
    recovered = await recommend(mesh, unknown)
    assert assign_calls() - before == 1
    assert "experiment" not in recovered["degraded"]
    assert {e["variant"] for e in recovered["experiments"]} != {"control"}
