"""The full mesh as separate processes, started and stopped the way `make up` does it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from mesh.ports import DEFAULT_PORTS, free_port
from mesh.tls import Transport
from ops import supervisor
from tests.inprocess import write_tenants

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def layout(
    artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[supervisor.Layout]:
    base = tmp_path_factory.mktemp("e2e")
    mesh = supervisor.Layout(
        var_dir=base / "var",
        artifacts=artifacts_root,
        ports={name: free_port() for name in DEFAULT_PORTS},
        http_port=free_port(),
        redis_port=free_port(),
        tenants=write_tenants(base / "tenants.json"),
        extra_env={
            "RECMESH_GATEWAY_DEADLINE_S": "1.0",
            "RECMESH_GATEWAY_RANKING_BUDGET_S": "0.5",
            "RECMESH_GATEWAY_RETRIEVAL_BUDGET_S": "0.4",
            "RECMESH_GATEWAY_QUOTA_BUDGET_S": "0.2",
            "RECMESH_GATEWAY_EXPERIMENT_BUDGET_S": "0.2",
            "RECMESH_RETRIEVAL_FEATURE_BUDGET_S": "0.3",
            "RECMESH_RANKING_FEATURE_BUDGET_S": "0.3",
        },
    )
    try:
        supervisor.up(mesh, timeout_s=90)
        yield mesh
    finally:
        supervisor.down(mesh)


def call(
    layout: supervisor.Layout, path: str, body: Any, key: str | None = "demo-key"
) -> tuple[int, Any, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{layout.http_port}{path}",
        data=json.dumps(body).encode(),
        headers={"x-api-key": key} if key else {},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def test_every_process_is_serving(layout: supervisor.Layout) -> None:
    rows = supervisor.status(layout)
    assert {name: health for name, _, health in rows} == {
        "redis": "running",
        **{name: "SERVING" for name in DEFAULT_PORTS},
    }


def test_recommendation_through_every_process(layout: supervisor.Layout) -> None:
    status, body, _ = call(layout, "/v1/recommend", {"user_id": "u1", "num_items": 10})
    assert status == 200, body
    assert len(body["items"]) == 10
    # Every service answered (stages inside ranking may still trim work on a busy machine).
    assert not set(body["degraded"]) & {"quota", "experiment", "retrieval", "ranking"}


def test_event_round_trip(layout: supervisor.Layout) -> None:
    event_id = uuid.uuid4().hex
    event = {
        "event_id": event_id,
        "type": "click",
        "user_id": "u1",
        "item_id": "9",
        "ts": int(time.time() * 1000),
    }
    assert call(layout, "/v1/events", {"events": [event]})[:2] == (202, {"accepted": 1})
    assert call(layout, "/v1/events", {"events": [event]})[:2] == (202, {"accepted": 1})
    # The tools' identity (ops) may name a tenant to the events service (mesh.identity).
    address = f"127.0.0.1:{layout.ports['events']}"
    with layout.transport().sync_channel(address, server="events") as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for _ in range(100):
            reply = stub.Read(
                events_pb2.ReadRequest(limit=1000), metadata=(("x-recmesh-tenant", "demo"),)
            )
            stored = [e.event for e in reply.events if e.event.event_id == event_id]
            if stored:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        reply = stub.Read(
            events_pb2.ReadRequest(limit=1000), metadata=(("x-recmesh-tenant", "demo"),)
        )
    stored = [e.event for e in reply.events if e.event.event_id == event_id]
    # The client's id, and the internal one the log gave it (the set's item 9 is 9).
    assert [(e.item_ref, e.item_id, e.type) for e in stored] == [("9", 9, "click")]


def test_internal_ports_take_tenants_only_from_identities_allowed_to_name_them(
    layout: supervisor.Layout,
) -> None:
    address = f"127.0.0.1:{layout.ports['events']}"
    read = events_pb2.ReadRequest(limit=1)
    tenant = (("x-recmesh-tenant", "demo"),)
    attempts = {
        "plaintext": Transport.plaintext(),
        "ranking": Transport.load(True, layout.certs_dir, "ranking"),
    }
    codes = {}
    for name, transport in attempts.items():
        with transport.sync_channel(address, server="events") as channel:
            try:
                events_pb2_grpc.EventServiceStub(channel).Read(read, metadata=tenant, timeout=5)
            except grpc.RpcError as exc:
                codes[name] = exc.code()
    assert codes == {
        "plaintext": grpc.StatusCode.UNAVAILABLE,
        "ranking": grpc.StatusCode.PERMISSION_DENIED,
    }


def test_errors_401_400_429(layout: supervisor.Layout) -> None:
    assert call(layout, "/v1/recommend", {"user_id": "u1"}, key=None)[0] == 401
    status, body, _ = call(layout, "/v1/recommend", {"user_id": "u1", "num_items": -1})
    assert (status, body["field"]) == (400, "num_items")
    codes = [call(layout, "/v1/recommend", {"user_id": "u1"}, key="tiny-key")[0] for _ in range(4)]
    assert codes[:2] == [200, 200] and 429 in codes[2:]


def test_down_stops_only_what_up_started(layout: supervisor.Layout) -> None:
    stopped = supervisor.down(layout)
    assert set(stopped) == {"redis", *DEFAULT_PORTS}
    assert all(health != "SERVING" for _, _, health in supervisor.status(layout))
