"""Team-draft interleaving through the real mesh: the ranking service merges two rankings
of one request, and the gateway logs each impression's team, which credit reads back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core.experiments.interleaving import (
    INTERLEAVED,
    TEAM_A,
    inclusion_probabilities,
    preference_from_log,
    random_coins,
    team_draft,
)
from core.explore import rng_for
from gateway.knobs import interleave_arms
from mesh import redis as mesh_redis
from mesh.client import open_channel
from mesh.context import REQUEST_ID_KEY
from mesh.testing import tenant_metadata
from services.ranking.policy import PolicyBook
from services.ranking.servicer import RankingServicer
from tests.inprocess import Mesh, inprocess_mesh, write_tenants

if TYPE_CHECKING:
    RankingStub = ranking_pb2_grpc.RankingServiceAsyncStub

TENANT = "acme"
KEY = "rankers"
ARMS = ("heavy", "light")
BOOK = {
    "experiments": [
        {
            "key": KEY,
            "type": "interleave",
            "hash_version": 2,
            "tenants": [TENANT],
            "variants": [
                {"key": "heavy", "params": {"ranking.heavy": "on"}},
                {"key": "light", "params": {"ranking.heavy": "off", "ranking.diversity": "none"}},
            ],
        }
    ]
}


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    base = tmp_path_factory.mktemp("interleave")
    book = base / "experiments.json"
    book.write_text(json.dumps(BOOK))
    tenants = write_tenants(base / "tenants.json")
    async with inprocess_mesh(redis_url, artifacts_root, tenants, experiments=book) as running:
        servicer = running.servers["ranking"].service.servicer("RankingService")
        assert isinstance(servicer, RankingServicer)
        default = servicer.policies.default
        # No recent-CTR lift for the tenant: its counters (moving with other tests'
        # impressions) cannot change an order between two calls of a test.
        servicer.policies = PolicyBook(
            default, {TENANT: dataclasses.replace(default, ctr_weight=0.0)}
        )
        yield running


async def _candidates(mesh: Mesh, user: str) -> retrieval_pb2.RetrieveResponse:
    async with open_channel(mesh.addr("retrieval")) as channel:
        reply: retrieval_pb2.RetrieveResponse = await retrieval_pb2_grpc.RetrievalServiceStub(
            channel
        ).Retrieve(
            retrieval_pb2.RetrieveRequest(user_id=user),
            metadata=tenant_metadata(TENANT),
            timeout=10,
        )
        return reply


async def _rank(stub: RankingStub, request_id: str, **fields: Any) -> ranking_pb2.RankResponse:
    reply: ranking_pb2.RankResponse = await stub.Rank(
        ranking_pb2.RankRequest(num_items=10, **fields),
        metadata=(*tenant_metadata(TENANT), (REQUEST_ID_KEY, request_id)),
        timeout=10,
    )
    return reply


async def test_ranking_merges_the_two_arms_by_team_draft(mesh: Mesh) -> None:
    """The interleaved answer is exactly the team draft of the two arms' own answers, with
    the request's coins; each item names its team, its propensity is its probability of
    being shown over the coins, and nothing explores."""
    retrieved = await _candidates(mesh, "u11")
    base = {
        "user_id": "u11",
        "user_features": retrieved.user_features,
        "candidates": retrieved.candidates,
    }
    arm_a = ranking_pb2.RankerArm(key="heavy", heavy_mode=ranking_pb2.HEAVY_MODE_ON)
    arm_b = ranking_pb2.RankerArm(
        key="light", heavy_mode=ranking_pb2.HEAVY_MODE_OFF, diversity=ranking_pb2.DIVERSITY_NONE
    )
    async with open_channel(mesh.addr("ranking")) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        head_a = await _rank(stub, "a", heavy_mode=ranking_pb2.HEAVY_MODE_ON, **base)
        head_b = await _rank(
            stub,
            "b",
            heavy_mode=ranking_pb2.HEAVY_MODE_OFF,
            diversity=ranking_pb2.DIVERSITY_NONE,
            **base,
        )
        assert list(head_a.ranked.item_ids) != list(head_b.ranked.item_ids)
        for request_id in ("r-1", "r-2", "r-3", "r-4"):
            merged = await _rank(
                stub,
                request_id,
                interleave=ranking_pb2.Interleave(a=arm_a, b=arm_b),
                explore_share=0.5,  # ignored: an interleaved request does not explore
                **base,
            )
            a, b = list(head_a.ranked.item_ids), list(head_b.ranked.item_ids)
            expected = team_draft(a, b, 10, random_coins(rng_for(request_id, TENANT)))
            assert list(merged.ranked.item_ids) == list(expected.items)
            assert list(merged.teams) == [ARMS[t] for t in expected.teams]
            probabilities = inclusion_probabilities(a, b, 10)
            assert probabilities is not None
            assert list(merged.ranked.propensities) == pytest.approx(
                [probabilities[item] for item in expected.items]
            )
            assert all(0.0 < p <= 1.0 for p in merged.ranked.propensities)
            by_item_a = dict(zip(a, head_a.ranked.scores, strict=True))
            by_item_b = dict(zip(b, head_b.ranked.scores, strict=True))
            assert list(merged.ranked.scores) == pytest.approx(
                [
                    (by_item_a if t == TEAM_A else by_item_b)[item]
                    for item, t in zip(expected.items, expected.teams, strict=True)
                ]
            )
            assert merged.degraded == [] and "rerank" in [s.stage for s in merged.stages]


async def test_arms_with_one_key_are_refused_naming_the_field(mesh: Mesh) -> None:
    retrieved = await _candidates(mesh, "u12")
    arm = ranking_pb2.RankerArm(key="same")
    async with open_channel(mesh.addr("ranking")) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _rank(
                stub,
                "bad",
                user_id="u12",
                candidates=retrieved.candidates,
                interleave=ranking_pb2.Interleave(a=arm, b=arm),
            )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", "interleave.b.key") in tuple(error.value.trailing_metadata() or ())


async def _request_events(
    mesh: Mesh, request_id: str, kind: str, wanted: int
) -> list[events_pb2.Event]:
    """The request's logged events of type ``kind``, once ``wanted`` of them arrived (or
    after 10 s)."""
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        logged: list[events_pb2.Event] = []
        for _ in range(200):
            reply = await stub.ReadRequestEvents(
                events_pb2.ReadRequestEventsRequest(request_id=request_id),
                metadata=tenant_metadata(TENANT),
            )
            logged = [stored.event for stored in reply.events if stored.event.type == kind]
            if len(logged) >= wanted:
                break
            await asyncio.sleep(0.05)
        return logged


async def test_the_gateway_logs_each_impressions_team_and_credit_reads_it(
    mesh: Mesh, redis_url: str
) -> None:
    headers = {"x-api-key": "acme-key"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            mesh.http_url + "/v1/recommend",
            json={"user_id": "u13", "num_items": 10},
            headers=headers,
        ) as response:
            assert response.status == 200
            body = await response.json()
        assert {"key": KEY, "variant": INTERLEAVED} in body["experiments"]
        assert "ranking" not in body["degraded"]
        request_id = body["request_id"]
        impressions = await _request_events(mesh, request_id, "impression", 10)
        assert len(impressions) == 10
        impressions.sort(key=lambda e: e.position)
        assert [str(e.item_id) for e in impressions] == [i["item_id"] for i in body["items"]]
        assert {e.team for e in impressions} == set(ARMS)
        assert all(e.variants[KEY] == INTERLEAVED for e in impressions)
        assert all(0.0 < e.propensity <= 1.0 for e in impressions)
        by_team = {team: [e.item_id for e in impressions if e.team == team] for team in ARMS}
        assert abs(len(by_team["heavy"]) - len(by_team["light"])) <= 1
        # Two of heavy's items clicked and one of light's: heavy wins the request.
        now_ms = int(time.time() * 1000)
        clicks = [
            {
                "event_id": f"{request_id}:click:{item}",
                "type": "click",
                "user_id": "u13",
                "item_id": str(item),
                "request_id": request_id,
                "ts": now_ms,
            }
            for item in (*by_team["heavy"][:2], by_team["light"][0])
        ]
        async with session.post(
            mesh.http_url + "/v1/events", json={"events": clicks}, headers=headers
        ) as response:
            assert response.status == 202
    assert len(await _request_events(mesh, request_id, "click", 3)) == 3
    client = mesh_redis.client(redis_url)
    try:
        found = await preference_from_log(client, TENANT, KEY, ARMS, bootstrap=0)
    finally:
        await client.aclose()
    assert (found.requests, found.clicked_requests) == (1, 1)
    assert (found.wins_a, found.wins_b, found.ties) == (1, 0, 0)
    assert (found.users, found.users_a) == (1, 1)


def test_the_gateway_sends_the_first_interleaving_assignments_arms() -> None:
    from recmesh.experiment.v1 import experiment_pb2

    assignments = [
        experiment_pb2.Assignment(experiment_key="ab", variant_key="t", params={"x": "1"}),
        experiment_pb2.Assignment(
            experiment_key=KEY,
            variant_key=INTERLEAVED,
            arms=[
                experiment_pb2.Arm(key="heavy", params={"ranking.heavy": "on"}),
                experiment_pb2.Arm(
                    key="light",
                    params={
                        "ranking.heavy": "off",
                        "ranking.heavy_keep": "30",
                        "ranking.mmr_lambda": "0.4",
                        "ranking.ctr_weight": "0",
                        "ranking.freshness_boost": "bad",  # ignored with a warning
                    },
                ),
            ],
        ),
    ]
    interleave = interleave_arms(assignments)
    assert interleave is not None
    assert (interleave.a.key, interleave.a.heavy_mode) == ("heavy", ranking_pb2.HEAVY_MODE_ON)
    b = interleave.b
    assert (b.key, b.heavy_mode, b.heavy_keep) == ("light", ranking_pb2.HEAVY_MODE_OFF, 30)
    assert b.mmr_lambda == pytest.approx(0.4)
    assert b.HasField("ctr_weight") and b.ctr_weight == 0.0
    assert not b.HasField("freshness_boost")
    assert interleave_arms(assignments[:1]) is None
