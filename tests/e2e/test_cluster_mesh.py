"""The whole mesh as processes on a Valkey Cluster of three masters (``make test-cluster``).

Runs when ``redis_url`` names a cluster (``RECMESH_TEST_REDIS=cluster``); against one
server the same processes are tested by ``test_mesh_processes``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from core import keys
from mesh import redis as mesh_redis
from mesh.ports import DEFAULT_PORTS, free_port
from ops import supervisor
from tests.e2e.test_mesh_processes import call
from tests.inprocess import write_tenants

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def layout(
    redis_url: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[supervisor.Layout]:
    if not mesh_redis.is_cluster(redis_url):
        pytest.skip("needs a cluster: make test-cluster (RECMESH_TEST_REDIS=cluster)")
    artifacts_root: Path = request.getfixturevalue("artifacts_root")  # trained only now
    base = tmp_path_factory.mktemp("e2e-cluster")
    mesh = supervisor.Layout(
        var_dir=base / "var",
        artifacts=artifacts_root,
        ports={name: free_port() for name in DEFAULT_PORTS},
        http_port=free_port(),
        redis_url=redis_url,
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


def test_the_tenants_live_on_different_masters(redis_url: str, layout: supervisor.Layout) -> None:
    client = mesh_redis.blocking_client(redis_url)
    assert isinstance(client, redis.RedisCluster)
    try:
        owners = {
            tenant: client.nodes_manager.get_node_from_slot(
                key_slot(keys.events(tenant).encode())
            ).name
            for tenant in ("demo", "acme", "tiny")
        }
        assert len(set(owners.values())) > 1, owners  # the test spans masters
        assert all(client.exists(keys.meta(tenant)) for tenant in owners)  # materialised
    finally:
        client.close()


def test_a_recommendation_and_a_click_through_every_process(
    redis_url: str, layout: supervisor.Layout
) -> None:
    status, body, _ = call(layout, "/v1/recommend", {"user_id": "u1", "num_items": 10})
    assert status == 200, body
    assert len(body["items"]) == 10
    # Every service answered: quota's script, the features, both models, the assignment.
    assert not set(body["degraded"]) & {"quota", "experiment", "retrieval", "ranking"}

    clicked = body["items"][0]["item_id"]
    event = {
        "event_id": uuid.uuid4().hex,
        "type": "click",
        "user_id": "u1",
        "item_id": clicked,
        "request_id": body["request_id"],
        "ts": int(time.time() * 1000),
    }
    assert call(layout, "/v1/events", {"events": [event]})[:2] == (202, {"accepted": 1})
    # The events service appended it to demo's stream, and the projector (reading every
    # tenant's stream, one slot each) applied it to the user's outcomes.
    client = mesh_redis.blocking_client(redis_url)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            outcomes = client.lrange(keys.outcomes("demo", "u1"), 0, -1)
            if str(clicked).encode() in outcomes:
                break
            time.sleep(0.1)
        assert str(clicked).encode() in outcomes
    finally:
        client.close()
