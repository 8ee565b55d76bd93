"""``recmesh experiments interleaving``: the command against a log in a real Valkey."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.experiments.interleaving import INTERLEAVED
from mesh.server import MeshServer
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from ops import cli
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings

TENANT, KEY = "cli-interleave", "rankers"


@pytest.fixture(scope="module")
async def events_server(redis_url: str) -> AsyncIterator[MeshServer]:
    server = await built_server(build_events, EventsSettings(port=0, redis_url=redis_url))
    async with serving(server):
        yield server


def _book(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "experiments": [
                    {
                        "key": KEY,
                        "type": "interleave",
                        "tenants": [TENANT],
                        "variants": [
                            {"key": "heavy", "params": {"ranking.heavy": "on"}},
                            {"key": "light", "params": {"ranking.heavy": "off"}},
                        ],
                    },
                    {"key": "ab", "variants": [{"key": "c"}, {"key": "t"}]},
                ]
            }
        )
    )
    return path


async def test_the_command_prints_wins_and_the_preference(
    events_server: MeshServer,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log: list[events_pb2.Event] = []
    # Six users, one request each: heavy's item clicked in four, light's in one, none in one.
    for user, clicked_team in enumerate(["heavy", "heavy", "heavy", "heavy", "light", ""]):
        request_id = f"cli-r{user}"
        for item, team in ((10 * user, "heavy"), (10 * user + 1, "light")):
            log.append(
                events_pb2.Event(
                    event_id=f"{request_id}:{item}",
                    type="impression",
                    user_id=f"u{user}",
                    item_id=item,
                    request_id=request_id,
                    ts_ms=1_700_000_000_000,
                    variants={KEY: INTERLEAVED},
                    team=team,
                )
            )
            if team == clicked_team:
                log.append(
                    events_pb2.Event(
                        event_id=f"{request_id}:{item}:click",
                        type="click",
                        user_id=f"u{user}",
                        item_id=item,
                        request_id=request_id,
                        ts_ms=1_700_000_001_000,
                    )
                )
    async with channel_to(events_server) as channel:
        await events_pb2_grpc.EventServiceStub(channel).Append(
            events_pb2.AppendRequest(events=log), metadata=tenant_metadata(TENANT)
        )
    monkeypatch.setenv("RECMESH_EXPERIMENTS", str(_book(tmp_path / "experiments.json")))
    monkeypatch.setenv("REDIS_URL", redis_url)

    code = await asyncio.to_thread(
        cli.main, ["experiments", "interleaving", KEY, "--tenant", TENANT, "--json"]
    )
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    assert found["arms"] == {"a": "heavy", "b": "light"}
    assert (found["requests"], found["clicked_requests"]) == (6, 5)
    assert (found["wins_a"], found["wins_b"], found["ties"]) == (4, 1, 0)
    assert found["preference"] == pytest.approx(0.6)
    assert found["p_value"] == pytest.approx(0.375)  # 2 * P(X >= 4), X ~ Bin(5, 1/2)

    code = await asyncio.to_thread(
        cli.main, ["experiments", "interleaving", KEY, "--tenant", TENANT]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "wins           A 4, B 1, ties 0" in text and "favours heavy" in text

    code = await asyncio.to_thread(cli.main, ["experiments", "interleaving", "ab"])
    assert code == 1
    assert "A/B experiment" in capsys.readouterr().out
