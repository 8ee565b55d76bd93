"""Exposures the gateway logs, and experiment reports through the gateway and the CLI, on
the whole mesh in-process (real services, real Valkey)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.experiment.v1 import experiment_pb2

from core.experiments.book import load_experiments
from gateway.exposures import ExposureMemo, exposure_id, exposures
from mesh.client import open_channel
from mesh.context import TENANT_KEY
from ops import experiments_report
from tests.inprocess import PROJECT, Mesh, accepted

BOOK = PROJECT / "config" / "experiments.json"


async def user_events(mesh: Mesh, user: str, wanted: int) -> list[events_pb2.Event]:
    """The demo log's events of ``user``, once at least ``wanted`` are stored (5 s at most)."""
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for _ in range(100):
            reply = await stub.ReadUserEvents(
                events_pb2.ReadUserEventsRequest(user_id=user, limit=1000),
                metadata=[(TENANT_KEY, "demo")],
            )
            if len(reply.events) >= wanted:
                return [stored.event for stored in reply.events]
            await asyncio.sleep(0.05)
    pytest.fail(f"{len(reply.events)} of {wanted} events of {user} stored after 5 s")


async def test_exposures_are_logged_once_per_user_variant_and_day_with_the_book_version(
    mesh: Mesh,
) -> None:
    user = "x" + uuid.uuid4().hex[:10]
    first = await accepted(mesh, "/v1/recommend", {"user_id": user, "num_items": 3})
    second = await accepted(mesh, "/v1/recommend", {"user_id": user, "num_items": 3})
    assigned = {e["key"]: e["variant"] for e in first["experiments"]}
    assert assigned and first["degraded"] == [] and second["experiments"] == first["experiments"]
    shown = len(first["items"]) + len(second["items"])
    events = await user_events(mesh, user, len(assigned) + shown)
    await asyncio.sleep(0.2)  # nothing more comes
    events = await user_events(mesh, user, len(assigned) + shown)

    logged = [e for e in events if e.type == "exposure"]
    version = load_experiments(BOOK).version
    assert sorted(dict(e.variants).popitem() for e in logged) == sorted(assigned.items())
    for exposure in logged:
        key, variant = dict(exposure.variants).popitem()
        assert exposure.book_version == version
        assert exposure.request_id == first["request_id"]
        assert exposure.event_id == exposure_id(user, key, variant, exposure.ts_ms)
    # Exposures go first, before the impressions of the answer that exposed the user.
    assert [e.type for e in events[: len(logged)]] == ["exposure"] * len(logged)
    impressions = [e for e in events if e.type == "impression"]
    assert len(impressions) == shown
    assert all(e.latency_ms > 0 and dict(e.variants) == assigned for e in impressions)

    # Another gateway (no memo) sends the same ids that day: the events service drops them.
    again = exposures(
        ExposureMemo(0),
        "demo",
        user,
        second["request_id"],
        [experiment_pb2.Assignment(experiment_key=k, variant_key=v) for k, v in assigned.items()],
        version,
        int(time.time() * 1000),
    )
    assert {e.event_id for e in again} == {e.event_id for e in logged}
    async with open_channel(mesh.addr("events")) as channel:
        reply = await events_pb2_grpc.EventServiceStub(channel).Append(
            events_pb2.AppendRequest(events=again), metadata=[(TENANT_KEY, "demo")]
        )
    assert (reply.appended, reply.duplicates) == (0, len(again))


def test_an_exposure_id_is_one_per_user_experiment_variant_and_utc_day() -> None:
    day = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000
    same = exposure_id("u1", "exp", "a", day + 1)
    assert same == exposure_id("u1", "exp", "a", day + 86_399_999)
    others = {
        exposure_id("u1", "exp", "a", day + 86_400_000),
        exposure_id("u1", "exp", "a", day - 1),
        exposure_id("u2", "exp", "a", day),
        exposure_id("u1", "exp2", "a", day),
        exposure_id("u1", "exp", "b", day),
    }
    assert same not in others and len(others) == 5
    assert len(same) <= 128


async def _get(mesh: Mesh, path: str, api_key: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(mesh.http_url + path, headers={"x-api-key": api_key}) as response,
    ):
        body: dict[str, Any] = await response.json()
        return response.status, body


async def test_the_report_route_serves_a_tenants_own_experiments_only(mesh: Mesh) -> None:
    await accepted(mesh, "/v1/recommend", {"user_id": "r" + uuid.uuid4().hex[:8]})
    # The answer's exposures reach the log after it (the gateway's impressions linger).
    for _ in range(100):
        status, body = await _get(mesh, "/v1/experiments/retrieval-k/report", "demo-key")
        assert status == 200, body
        if sum(v["users"] for v in body["variants"]) >= 1:
            break
        await asyncio.sleep(0.05)
    assert body["experiment_key"] == "retrieval-k" and body["tenant"] == "demo"
    assert [v["variant_key"] for v in body["variants"]] == ["control", "wide"]
    assert sum(v["users"] for v in body["variants"]) >= 1
    assert body["book_version"] == load_experiments(BOOK).version
    assert {g["name"] for v in body["variants"] for g in v["guardrails"]} == {
        "degraded_share",
        "p99_latency_ms",
        "error_rate",
    }

    # heavy-ranker-holdout is declared for demo and acme only; tiny asks in vain.
    status, body = await _get(mesh, "/v1/experiments/heavy-ranker-holdout/report", "tiny-key")
    assert (status, body["error"]) == (404, "NOT_FOUND")
    status, body = await _get(mesh, "/v1/experiments/no-such/report", "demo-key")
    assert status == 404
    status, body = await _get(mesh, "/v1/experiments/retrieval-k/report", "nope")
    assert status == 401

    status, spec = await _get(mesh, "/openapi.json", "")
    route = spec["paths"]["/v1/experiments/{key}/report"]["get"]
    assert {"200", "404"} <= set(route["responses"])
    assert "Report" in spec["components"]["schemas"]


async def test_the_cli_prints_the_report_as_json_text_and_a_plot(
    mesh: Mesh, tmp_path: Path
) -> None:
    address = mesh.addr("experiment")
    plot = tmp_path / "report.png"
    code, text = await asyncio.to_thread(
        experiments_report.show, address, "demo", "retrieval-k", True, plot
    )
    assert code == 0, text
    report = json.loads(text)
    assert report["experiment_key"] == "retrieval-k" and report["tenant"] == "demo"
    assert [v["variant_key"] for v in report["variants"]] == ["control", "wide"]
    assert "srm" in report and "data_quality" in report
    assert plot.stat().st_size > 0
    code, text = await asyncio.to_thread(
        experiments_report.show, address, "demo", "retrieval-k", False
    )
    assert code == 0 and "experiment retrieval-k of tenant demo" in text and "sample ratio" in text
    code, text = await asyncio.to_thread(
        experiments_report.show, address, "tiny", "heavy-ranker-holdout", True
    )
    assert code == 1 and "NOT_FOUND" in text
