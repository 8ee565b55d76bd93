"""``recmesh events tail``: the newest events of a tenant's log, filtered, paged through."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest

from ops import cli, events_tail
from tests.inprocess import Mesh, accepted


async def post_events(mesh: Mesh, user: str, kinds: list[str]) -> list[str]:
    ids = [uuid.uuid4().hex for _ in kinds]
    now = int(time.time() * 1000)
    body = {
        "events": [
            {"event_id": i, "type": k, "user_id": user, "item_id": str(n), "ts": now}
            for n, (i, k) in enumerate(zip(ids, kinds, strict=True))
        ]
    }
    await accepted(mesh, "/v1/events", body)
    return ids


async def tail(
    mesh: Mesh, limit: int, user: str, kind: str = "", page: int = events_tail.PAGE
) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        return events_tail.tail(
            events_tail.stored_events(mesh.addr("events"), "demo", page), limit, user, kind
        )

    return await asyncio.to_thread(read)


async def test_tail_pages_through_the_log_and_keeps_the_newest_matching_events(
    mesh: Mesh,
) -> None:
    user = "tail-" + uuid.uuid4().hex[:6]
    ids = await post_events(mesh, user, ["click", "impression", "click", "conversion", "click"])
    for _ in range(100):
        rows = await tail(mesh, 10, user, page=2)  # several pages even for a short log
        if len(rows) == 5:
            break
        await asyncio.sleep(0.05)
    assert [r["event_id"] for r in rows] == ids
    positions = [tuple(map(int, r["log_position"].split("-"))) for r in rows]
    assert positions == sorted(positions)
    newest_clicks = await tail(mesh, 2, user, "click")
    assert [r["event_id"] for r in newest_clicks] == [ids[2], ids[4]]
    assert await tail(mesh, 5, "nobody-" + uuid.uuid4().hex) == []


async def test_the_command_prints_one_json_object_per_event(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    user = "tail-" + uuid.uuid4().hex[:6]
    ids = await post_events(mesh, user, ["click"])
    for _ in range(100):
        if await tail(mesh, 1, user):
            break
        await asyncio.sleep(0.05)
    monkeypatch.setenv("RECMESH_EVENTS_PORT", mesh.addr("events").rsplit(":", 1)[1])
    monkeypatch.setenv("RECMESH_TLS", "off")  # the in-process mesh is plaintext
    argv = ["events", "tail", "--tenant", "demo", "--user", user, "--json"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event_id"], e["type"], e["user_id"]) for e in printed] == [(ids[0], "click", user)]
    assert printed[0]["position"] == 0 and printed[0]["source"] == "SOURCE_UNSPECIFIED"
    # The client's item id and the internal one (the set's item 0; int64 as a JSON string).
    assert (printed[0]["item_ref"], printed[0]["item_id"]) == ("0", "0")
