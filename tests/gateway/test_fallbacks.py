"""Each downstream failing in turn: the gateway still answers and names the fallback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.inprocess import Mesh, inprocess_mesh, set_faults, write_tenants

DEMO = {"x-api-key": "demo-key"}


@pytest.fixture(scope="module")
async def faulty(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Mesh, Path]]:
    base = tmp_path_factory.mktemp("fallbacks")
    faults = base / "faults.json"
    async with inprocess_mesh(
        redis_url, artifacts_root, write_tenants(base / "tenants.json"), faults
    ) as mesh:
        yield mesh, faults


async def recommend(mesh: Mesh, user: str = "u1", n: int = 10) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mesh.http_url + "/v1/recommend", json={"user_id": user, "num_items": n}, headers=DEMO
        ) as response,
    ):
        return response.status, await response.json()


# Each case asks for its own user: the gateway serves a user it answered before from its
# assignment cache, so a repeated user would not reach the experiment fallback.
@pytest.mark.parametrize(
    ("service", "user", "degraded", "sources"),
    [
        ("ranking", "u1", ["ranking"], {"ann", "trending", "popular"}),
        ("retrieval", "u2", ["retrieval"], {"fallback"}),
        ("experiment", "u3", ["experiment"], {"ann", "trending", "popular"}),
        ("quota", "u4", ["quota"], {"ann", "trending", "popular"}),
    ],
)
async def test_a_failing_service_degrades_the_answer_not_the_status(
    faulty: tuple[Mesh, Path], service: str, user: str, degraded: list[str], sources: set[str]
) -> None:
    mesh, faults = faulty
    set_faults(mesh, faults, {service: {"*": {"error_rate": 1.0, "code": "UNAVAILABLE"}}})
    try:
        status, body = await recommend(mesh, user)
    finally:
        set_faults(mesh, faults, {})
    assert status == 200, body
    assert len(body["items"]) == 10
    assert set(body["degraded"]) >= set(degraded)
    assert {item["source"] for item in body["items"]} <= sources


async def test_a_failing_feature_service_leaves_the_request_path_alone(
    faulty: tuple[Mesh, Path],
) -> None:
    """Retrieval reads the user from the store itself and ranking scores with the set's
    rows: with every feature-service call failing, the user still gets ANN candidates,
    and at most the caches refreshed from the service (not yet aged out) are named."""
    mesh, faults = faulty
    set_faults(mesh, faults, {"feature": {"*": {"error_rate": 1.0, "code": "UNAVAILABLE"}}})
    try:
        status, body = await recommend(mesh, "u5")
    finally:
        set_faults(mesh, faults, {})
    assert status == 200, body
    assert len(body["items"]) == 10
    assert "user_features" not in body["degraded"]
    assert set(body["degraded"]) <= {"trending", "catalog", "item_features", "item_counters"}
    assert "ann" in {item["source"] for item in body["items"]}


async def test_hung_ranking_is_cut_by_the_deadline(faulty: tuple[Mesh, Path]) -> None:
    mesh, faults = faulty
    set_faults(mesh, faults, {"ranking": {"Rank": {"hang": True}}})
    try:
        status, body = await recommend(mesh)
    finally:
        set_faults(mesh, faults, {})
    assert status == 200
    assert "ranking" in body["degraded"]
    assert body["stage_ms"]["ranking"] < 1100  # the in-process gateway's ranking budget is 1 s
