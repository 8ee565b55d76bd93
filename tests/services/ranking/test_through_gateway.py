"""Ranking through the gateway: variant knobs reach ranking, propensities reach the event log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2

from gateway.knobs import Knobs
from mesh.client import open_channel
from mesh.testing import tenant_metadata
from services.ranking.policy import PolicyBook
from services.ranking.servicer import RankingServicer
from tests.inprocess import Mesh, inprocess_mesh, write_tenants

DEMO = {"x-api-key": "demo-key"}


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    tenants = write_tenants(
        tmp_path_factory.mktemp("ranking-gw") / "tenants.json",
        {"opelog": ("opelog-key", 1000, 2000)},  # a log only the off-policy test writes
    )
    async with inprocess_mesh(redis_url, artifacts_root, tenants) as running:
        servicer = running.servers["ranking"].service.servicer("RankingService")
        assert isinstance(servicer, RankingServicer)
        default = servicer.policies.default
        # The demo and opelog tenants explore 30 % of their slots (3 of 10).
        explores = dataclasses.replace(default, explore_share=0.3)
        servicer.policies = PolicyBook(default, {"demo": explores, "opelog": explores})
        yield running


async def recommend(mesh: Mesh, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(mesh.http_url + "/v1/recommend", json=body, headers=DEMO) as response,
    ):
        assert response.status == 200
        reply: dict[str, Any] = await response.json()
        return reply


async def test_debug_output_explains_stages_and_gives_propensities(mesh: Mesh) -> None:
    body = await recommend(mesh, {"user_id": "u5", "num_items": 10, "debug": True})
    items = body["items"]
    explored = [i for i in items if i["source"] == "explore"]
    assert len(items) == 10 and len(explored) == 3
    assert items[0]["source"] != "explore"
    assert all(i["propensity"] == pytest.approx(0.03) for i in explored)
    assert all(i["propensity"] == 1.0 for i in items if i["source"] != "explore")
    stages = {s["stage"]: s for s in body["stages"]}
    assert stages["rerank"]["details"]["explored"] == 3
    assert stages["heavy"]["budget_ms"] > 0
    assert "cache_hits" in stages["item_features"]["details"]


async def test_impressions_carry_the_propensities_ranking_returned(mesh: Mesh) -> None:
    body = await recommend(mesh, {"user_id": "u6", "num_items": 10, "debug": True})
    shown = {i["item_id"]: i["propensity"] for i in body["items"]}
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        logged: list[events_pb2.Event] = []
        for _ in range(100):
            # By request id: the tenant's log holds every other test's events too.
            reply = await stub.ReadRequestEvents(
                events_pb2.ReadRequestEventsRequest(request_id=body["request_id"]),
                metadata=tenant_metadata("demo"),
            )
            logged = [
                e.event
                for e in reply.events
                if e.event.request_id == body["request_id"] and e.event.type == "impression"
            ]
            if len(logged) == 10:
                break
            await asyncio.sleep(0.05)
    assert len(logged) == 10
    # The answer names the set's items by their number, the log by their internal id (the same).
    assert {str(e.item_id): e.propensity for e in logged} == pytest.approx(shown)
    assert sum(e.propensity for e in logged) == pytest.approx(7 + 3 * 0.03)
    # The first impression carries the answer's support: the 7 ranked items in their
    # order, then the pool of 100 the 3 explored ones were drawn from (3 / 100 each).
    logged.sort(key=lambda e: e.position)
    support = list(logged[0].support)
    assert all(not e.support for e in logged[1:])
    assert len(support) == 7 + 100 and len(set(support)) == len(support)
    ranked = [e.item_id for e in logged if e.propensity == 1.0]
    explored = [e.item_id for e in logged if e.propensity < 1.0]
    assert ranked == support[:7]
    assert set(explored) <= set(support[7:])


async def test_a_tenant_without_exploration_shows_no_explore_slots(mesh: Mesh) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mesh.http_url + "/v1/recommend",
            json={"user_id": "u5", "debug": True},
            headers={"x-api-key": "acme-key"},
        ) as response,
    ):
        body = await response.json()
    assert {i["source"] for i in body["items"]} <= {"ann", "trending", "popular"}
    assert {i["propensity"] for i in body["items"]} == {1.0}


def test_variant_params_become_rank_request_fields() -> None:
    knobs = Knobs.from_variants(
        {
            "ranking.candidates": "400",
            "ranking.prerank_keep": "120",
            "ranking.heavy_keep": "30",
            "ranking.diversity": "cap",
            "ranking.mmr_lambda": "0",
            "ranking.explore_share": "0.1",
            "ranking.budget_ms.heavy": "15",
        }
    )
    request = ranking_pb2.RankRequest(**knobs.rank_fields())
    assert (request.candidates_keep, request.prerank_keep, request.heavy_keep) == (400, 120, 30)
    assert request.diversity == ranking_pb2.DIVERSITY_CATEGORY_CAP
    assert request.HasField("mmr_lambda") and request.mmr_lambda == 0.0
    assert request.explore_share == pytest.approx(0.1)
    assert dict(request.stage_budget_ms) == {"heavy": 15.0}
    unset = ranking_pb2.RankRequest(**Knobs.from_variants({}).rank_fields())
    assert not unset.HasField("mmr_lambda") and not unset.HasField("explore_share")


def test_bad_variant_params_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.funnel"):
        knobs = Knobs.from_variants(
            {
                "ranking.heavy_keep": "lots",
                "ranking.mmr_lambda": "1.5",
                "ranking.diversity": "shuffle",
                "ranking.budget_ms.heavy": "0",
                "ranking.prerank_keep": "90",
            }
        )
    assert knobs.rank_fields() == {
        "candidates_keep": 0,
        "prerank_keep": 90,
        "heavy_keep": 0,
        "diversity": ranking_pb2.DIVERSITY_UNSPECIFIED,
        "stage_budget_ms": {},
    }
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == 4


async def test_ope_estimates_a_final_stage_from_the_mesh_log(
    mesh: Mesh, artifacts_root: Path, redis_url: str, tmp_path: Path
) -> None:
    # Twenty answers of the opelog tenant (30 % of the slots explored), the first item clicked;
    # fixed request ids, so exploration draws the same items on every run.
    bodies = []
    async with aiohttp.ClientSession() as session:
        for k in range(20):
            async with session.post(
                mesh.http_url + "/v1/recommend",
                json={"user_id": f"u{k}", "num_items": 10},
                headers={"x-api-key": "opelog-key", "x-request-id": f"ope-test-{k}"},
            ) as response:
                assert response.status == 200
                bodies.append(await response.json())
    clicks = [
        {
            "event_id": f"ope-click-{b['request_id']}",
            "type": "click",
            "user_id": f"u{k}",
            "item_id": b["items"][0]["item_id"],
            "request_id": b["request_id"],
            "ts": int(time.time() * 1000),
        }
        for k, b in enumerate(bodies)
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mesh.http_url + "/v1/events",
            json={"events": clicks},
            headers={"x-api-key": "opelog-key"},
        ) as r,
    ):
        assert r.status == 202
    # Every answer whole in the log (its impressions counted once by id: delivery is at
    # least once), and its click. The outbox relay delivers rows in rounds of a fixed
    # count, so a round can end inside an answer: its support already in the log, its last
    # impressions one round later.
    shown = {b["request_id"]: len(b["items"]) for b in bodies}
    wanted = set(shown)
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for _ in range(200):
            stored: list[events_pb2.StoredEvent] = []
            while True:
                after = stored[-1].position if stored else ""
                reply = await stub.Read(
                    events_pb2.ReadRequest(after=after, limit=1000),
                    metadata=tenant_metadata("opelog"),
                )
                stored += reply.events
                if len(reply.events) < 1000:
                    break
            found = {e.event.request_id for e in stored if e.event.support}
            clicked = {e.event.request_id for e in stored if e.event.type == "click"}
            shown_ids = {
                (e.event.request_id, e.event.event_id)
                for e in stored
                if e.event.type == "impression"
            }
            logged = Counter(r for r, _ in shown_ids)
            whole = {r for r, n in shown.items() if logged[r] == n}
            if wanted <= found and wanted <= clicked and wanted <= whole:
                break
            await asyncio.sleep(0.05)
    assert wanted <= found and wanted <= clicked
    assert wanted <= whole, {r: (logged[r], n) for r, n in shown.items()}

    def ope(policy: dict[str, Any]) -> dict[str, Any]:
        path = tmp_path / "policy.json"
        path.write_text(json.dumps(policy))
        argv = ["ope", "--policy", str(path), "--json", "--root", str(artifacts_root)]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "training",
                *argv,
                "--tenant",
                "opelog",
                "--redis-url",
                redis_url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        report: dict[str, Any] = json.loads(run.stdout)
        return report

    # The ranking service's own final stage as the candidate: every weight is exactly 1,
    # so the off-policy estimates are the logged CTR.
    itself = ope({"order": "logged", "explore_share": 0.3, "explore_pool": 100})
    assert itself["kind"] == "final stage"
    assert (itself["requests"], itself["clicks"]) == (20, 20)
    assert (itself["max_weight"], itself["mean_weight"]) == (pytest.approx(1.0),) * 2
    assert itself["ips"]["estimate"] == pytest.approx(itself["naive"]["estimate"])
    # Exploiting the ranker's order instead: a pool item it shows weighs 1 / (3 / M), M the
    # answer's pool (100, or what retrieval left after the 7 ranked).
    exploit = ope({"explore_share": 0.0})
    assert exploit["requests"] == itself["requests"]
    pools = {len(e.event.support) - 7 for e in stored if e.event.request_id in wanted}
    assert any(exploit["max_weight"] == pytest.approx(m / 3) for m in pools), pools
