"""``recmesh users erase``: the command against a real events service and Valkey."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core import keys
from mesh import redis as mesh_redis
from mesh.server import MeshServer
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from ops import cli
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings


@pytest.fixture(scope="module")
async def events_server(redis_url: str) -> AsyncIterator[MeshServer]:
    server = await built_server(build_events, EventsSettings(port=0, redis_url=redis_url))
    async with serving(server):
        yield server


async def test_erase_prints_the_counts_and_is_audited_as_the_named_operator(
    events_server: MeshServer,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant, user = "us" + uuid.uuid4().hex[:8], "u-" + uuid.uuid4().hex
    now = int(time.time() * 1000)
    async with channel_to(events_server) as channel:
        await events_pb2_grpc.EventServiceStub(channel).Append(
            events_pb2.AppendRequest(
                events=[
                    events_pb2.Event(
                        event_id=uuid.uuid4().hex, type=kind, user_id=user, item_id=3, ts_ms=now
                    )
                    for kind in ("impression", "click")
                ]
            ),
            metadata=tenant_metadata(tenant),
        )
    monkeypatch.setenv("RECMESH_EVENTS_PORT", str(events_server.port))
    monkeypatch.setenv("RECMESH_TLS", "off")  # an in-process server: plaintext

    code = await asyncio.to_thread(
        cli.main, ["users", "erase", "--tenant", tenant, "--user", user, "--by", "dpo", "--json"]
    )

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tenant"] == tenant and printed["events"] == 2
    assert printed["subject"] == "sha256:" + hashlib.sha256(user.encode()).hexdigest()
    assert printed["items_recomputed"] == 1 and printed["dead_letters"] == 0
    client = mesh_redis.client(redis_url)
    try:
        assert await client.xlen(keys.events(tenant)) == 0
        [(_, record)] = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.audit(tenant))
        )
        assert record[b"requested_by"] == b"dpo" and record[b"events"] == b"2"
    finally:
        await client.aclose()

    code = await asyncio.to_thread(cli.main, ["users", "erase", "--tenant", tenant, "--user", user])
    text = capsys.readouterr().out
    assert code == 0 and f"from tenant {tenant}" in text and "events" in text


async def test_erase_exits_1_on_a_refused_user_id(
    events_server: MeshServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECMESH_EVENTS_PORT", str(events_server.port))
    monkeypatch.setenv("RECMESH_TLS", "off")  # an in-process server: plaintext
    code = await asyncio.to_thread(
        cli.main, ["users", "erase", "--tenant", "demo", "--user", "x" * 129]
    )
    assert code == 1 and "INVALID_ARGUMENT" in capsys.readouterr().out
