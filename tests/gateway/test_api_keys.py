"""API keys at the gateway, over the whole mesh in-process: two keys valid during a
rotation, a revoked key refused without a restart, an expired key, scopes on both APIs
(403 / PERMISSION_DENIED naming the scope), erasure by an ``admin`` key, a broken tenant
file that keeps the registry before it, a rate change the quota service serves from the
same reload, and no tenant label on a request refused before its tenant is known.

The tenant file is edited while the mesh runs: each test restores it (``tenant_file``).
Reloads are awaited by polling with a generous timeout; the time they took is printed
(``-s``) for the record, never asserted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY as METRICS
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from core import keys as store_keys
from mesh import redis as mesh_redis
from mesh.client import open_channel
from mesh.context import TENANT_KEY
from mesh.tenants import SCOPES, digest_of
from ops import keys
from tests.inprocess import TENANTS, Mesh, inprocess_mesh

RELOAD_TIMEOUT_S = 15.0
"""Generous: the default poll is 0.5 s, but a loaded CI machine can starve the loop."""

KEYS = {
    "all": ("demo-key", list(SCOPES), {}),
    "rec": ("demo-rec", ["recommend"], {}),
    "ev": ("demo-events", ["events"], {}),
    "late": ("demo-late", list(SCOPES), {"not_after": "2026-01-01T00:00:00Z"}),
}
"""demo's keys: id -> (key, scopes, other fields). The other tenants stay in the older
single-digest form, which the mesh must still serve."""


def registry_document() -> dict[str, Any]:
    tenants: dict[str, Any] = {
        name: {"api_key_sha256": digest_of(key), "rate": rate, "burst": burst}
        for name, (key, rate, burst) in TENANTS.items()
    }
    tenants["demo"] = {
        "rate": TENANTS["demo"][1],
        "burst": TENANTS["demo"][2],
        "keys": [
            {"id": key_id, "sha256": digest_of(key), "scopes": scopes, **extra}
            for key_id, (key, scopes, extra) in KEYS.items()
        ],
    }
    return {"tenants": tenants}


@pytest.fixture(scope="module")
async def mesh_and_file(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Mesh, Path]]:
    path = tmp_path_factory.mktemp("api-keys") / "tenants.json"
    path.write_text(json.dumps(registry_document()))
    async with inprocess_mesh(redis_url, artifacts_root, path) as running:
        yield running, path


@pytest.fixture
def mesh(mesh_and_file: tuple[Mesh, Path]) -> Mesh:
    return mesh_and_file[0]


Probe = tuple[Callable[[], Awaitable[Any]], Any]
"""A coroutine function and the answer it gives once the mesh serves the restored file."""


@pytest.fixture
async def tenant_file(mesh_and_file: tuple[Mesh, Path]) -> AsyncIterator[tuple[Path, list[Probe]]]:
    """The running mesh's tenant file, and a list of probes the test adds: after the test
    the file is put back as it was and each probe awaited (the next test starts from the
    registry it would have had)."""
    _, path = mesh_and_file
    before = path.read_bytes()
    probes: list[Probe] = []
    yield path, probes
    path.write_bytes(before)
    for probe, wanted in probes:
        await until(probe, wanted)


async def request(
    mesh: Mesh, method: str, path: str, key: str | None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    headers = {"x-api-key": key} if key is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, mesh.http_url + path, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def status_of(mesh: Mesh, key: str) -> int:
    return (await request(mesh, "POST", "/v1/recommend", key, {"user_id": "u1"}))[0]


async def until(probe: Callable[[], Awaitable[Any]], wanted: Any) -> float:
    """Seconds until ``probe()`` answers ``wanted`` (fails after RELOAD_TIMEOUT_S)."""
    started = time.monotonic()
    while (got := await probe()) != wanted:
        assert time.monotonic() - started < RELOAD_TIMEOUT_S, f"still {got!r}, not {wanted!r}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def sample(name: str, **labels: str) -> float:
    return METRICS.get_sample_value(name, labels) or 0.0


def event(user_id: str) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "type": "click",
        "user_id": user_id,
        "item_id": "42",
        "request_id": "r1",
        "ts": int(time.time() * 1000),
    }


async def test_two_keys_serve_during_a_rotation_and_a_revoked_one_is_refused_without_a_restart(
    mesh: Mesh, tenant_file: tuple[Path, list[Probe]]
) -> None:
    path, restored = tenant_file
    old, _ = keys.add_key(path, "demo", ["recommend"], label="rotation: old")
    new, new_entry = keys.add_key(path, "demo", ["recommend"], label="rotation: new")
    restored.append((lambda: status_of(mesh, new), 401))
    added_s = await until(lambda: status_of(mesh, new), 200)
    assert await status_of(mesh, old) == 200  # both valid at once
    old_id = next(
        entry["id"]
        for entry in json.loads(path.read_text())["tenants"]["demo"]["keys"]
        if entry.get("label") == "rotation: old"
    )
    revoked_before = sample("recmesh_auth_failures_total", reason="revoked", tenant="demo")

    assert keys.revoke_key(path, "demo", old_id)
    revoked_s = await until(lambda: status_of(mesh, old), 401)
    status, body = await request(mesh, "POST", "/v1/recommend", old, {"user_id": "u1"})
    assert (status, body["error"]) == (401, "UNAUTHENTICATED")
    assert "revoked" in body["message"] and old not in body["message"]
    assert await status_of(mesh, new) == 200  # the new key never stopped
    async with open_channel(mesh.addr("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recommend(
                gateway_pb2.RecommendRequest(user_id="u1"), metadata=[("x-api-key", old)]
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.Recommend(
            gateway_pb2.RecommendRequest(user_id="u1"), metadata=[("x-api-key", new)]
        )
    assert sample("recmesh_auth_failures_total", reason="revoked", tenant="demo") >= (
        revoked_before + 2
    )
    assert sample("recmesh_api_key_admitted_total", tenant="demo", key_id=new_entry["id"]) >= 2
    print(
        f"\nkey added: served after {added_s:.2f} s; key revoked: refused after {revoked_s:.2f} s"
    )


async def test_an_expired_key_is_refused(mesh: Mesh) -> None:
    status, body = await request(mesh, "POST", "/v1/recommend", "demo-late", {"user_id": "u1"})
    assert (status, body["error"]) == (401, "UNAUTHENTICATED")
    assert "expired" in body["message"]


HTTP_SCOPES = [
    ("POST", "/v1/recommend", "demo-events", {"user_id": "u1"}, "recommend"),
    ("POST", "/v1/events", "demo-rec", {"events": [event("u1")]}, "events"),
    ("PUT", "/v1/items", "demo-events", {"items": []}, "catalog"),
    ("DELETE", "/v1/items/42", "demo-rec", None, "catalog"),
    ("GET", "/v1/experiments/retrieval-k/report", "demo-rec", None, "admin"),
    ("DELETE", "/v1/users/u1", "demo-events", None, "admin"),
]


@pytest.mark.parametrize(("method", "path", "key", "body", "scope"), HTTP_SCOPES)
async def test_a_key_without_the_routes_scope_is_403_naming_it(
    mesh: Mesh, method: str, path: str, key: str, body: Any, scope: str
) -> None:
    before = sample("recmesh_auth_failures_total", reason="scope", tenant="demo")
    status, answer = await request(mesh, method, path, key, body)
    assert (status, answer["error"]) == (403, "PERMISSION_DENIED"), answer
    assert f"lacks the '{scope}' scope" in answer["message"]
    assert sample("recmesh_auth_failures_total", reason="scope", tenant="demo") == before + 1


async def test_a_key_with_the_scope_is_served(mesh: Mesh) -> None:
    assert await status_of(mesh, "demo-rec") == 200
    status, _ = await request(mesh, "POST", "/v1/events", "demo-events", {"events": [event("u1")]})
    assert status == 202


async def test_a_key_without_the_methods_scope_is_permission_denied_on_grpc(mesh: Mesh) -> None:
    calls: list[tuple[str, Any, str, str]] = [
        ("Recommend", gateway_pb2.RecommendRequest(user_id="u1"), "demo-events", "recommend"),
        ("LogEvents", gateway_pb2.LogEventsRequest(), "demo-rec", "events"),
        ("UpsertItems", gateway_pb2.UpsertItemsRequest(), "demo-events", "catalog"),
        ("DeleteItems", gateway_pb2.DeleteItemsRequest(item_ids=["42"]), "demo-rec", "catalog"),
        ("EraseUser", gateway_pb2.EraseUserRequest(user_id="u1"), "demo-events", "admin"),
    ]
    async with open_channel(mesh.addr("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for method, message, key, scope in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await getattr(stub, method)(message, metadata=[("x-api-key", key)])
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert f"lacks the '{scope}' scope" in (refused.value.details() or ""), method


async def logged(mesh: Mesh, user_id: str) -> int:
    async with open_channel(mesh.addr("events")) as channel:
        # By user: the tenant's log holds every other test's events too.
        reply = await events_pb2_grpc.EventServiceStub(channel).ReadUserEvents(
            events_pb2.ReadUserEventsRequest(user_id=user_id, limit=1000),
            metadata=[(TENANT_KEY, "demo")],
        )
    return sum(1 for e in reply.events if e.event.user_id == user_id)


async def test_an_admin_key_erases_a_user_over_http_and_grpc(mesh: Mesh, redis_url: str) -> None:
    user = f"erase-{uuid.uuid4().hex[:8]}"
    status, _ = await request(mesh, "POST", "/v1/events", "demo-key", {"events": [event(user)]})
    assert status == 202
    await until(lambda: logged(mesh, user), 1)

    status, body = await request(mesh, "DELETE", f"/v1/users/{user}", "demo-key")
    assert status == 200, body
    subject = "sha256:" + hashlib.sha256(user.encode()).hexdigest()
    assert (body["tenant"], body["status"], body["subject"]) == ("demo", "erased", subject)
    assert body["events"] == 1 and body["audit_position"]
    assert await logged(mesh, user) == 0

    async with open_channel(mesh.addr("gateway")) as channel:
        reply = await gateway_pb2_grpc.GatewayServiceStub(channel).EraseUser(
            gateway_pb2.EraseUserRequest(user_id=user), metadata=[("x-api-key", "demo-key")]
        )
    assert (reply.status, reply.subject, reply.events) == ("erased", subject, 0)  # idempotent

    client = mesh_redis.client(redis_url)
    try:
        records = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(store_keys.audit("demo"))
        )
    finally:
        await client.aclose()
    ours = [fields for _, fields in records if fields.get(b"subject") == subject.encode()]
    assert len(ours) == 2
    assert {fields[b"requested_by"] for fields in ours} == {b"api-key:all"}  # the id, no key

    status, body = await request(mesh, "DELETE", "/v1/users/" + "u" * 200, "demo-key")
    assert (status, body.get("field")) == (400, "user_id")


async def refused_now() -> float:
    return sample("recmesh_tenants_file_refused")


async def test_a_broken_tenant_file_keeps_the_registry_before_it(
    mesh: Mesh, tenant_file: tuple[Path, list[Probe]]
) -> None:
    path, restored = tenant_file
    restored.append((refused_now, 0.0))
    refused = sample("recmesh_tenants_reloads_total", outcome="refused")
    path.write_text('{"tenants": {"demo": {"rate": ')  # a partial write
    refused_s = await until(refused_now, 1.0)
    assert sample("recmesh_tenants_reloads_total", outcome="refused") > refused
    assert await status_of(mesh, "demo-key") == 200
    assert await status_of(mesh, "acme-key") == 200
    assert await status_of(mesh, "demo-events") == 403  # the scopes are still the old file's
    print(f"\nbroken file refused after {refused_s:.2f} s")


async def test_a_rate_change_reaches_the_quota_service_with_the_same_file(
    mesh: Mesh, tenant_file: tuple[Path, list[Probe]]
) -> None:
    path, restored = tenant_file
    document = json.loads(path.read_text())
    document["tenants"]["tiny"].update(rate=7, burst=9)
    path.write_text(json.dumps(document))

    async def limits() -> tuple[float, int]:
        async with open_channel(mesh.addr("quota")) as channel:
            reply = await quota_pb2_grpc.QuotaServiceStub(channel).Acquire(
                quota_pb2.AcquireRequest(tenant="tiny", check_only=True),
                metadata=[(TENANT_KEY, "tiny")],
            )
        return reply.rate, reply.burst

    restored.append((limits, (TENANTS["tiny"][1], TENANTS["tiny"][2])))
    seconds = await until(limits, (7.0, 9))
    print(f"\nrate change served by the quota service after {seconds:.2f} s")


async def test_a_request_refused_before_its_tenant_is_known_has_no_tenant_label(
    mesh: Mesh,
) -> None:
    def count(api: str, route: str, code: str) -> dict[str, float]:
        return {
            s.labels["tenant"]: s.value
            for metric in METRICS.collect()
            if metric.name == "recmesh_gateway_requests"
            for s in metric.samples
            if s.name.endswith("_total")
            and (s.labels["api"], s.labels["route"], s.labels["code"]) == (api, route, code)
        }

    before = count("http", "/v1/recommend", "401")
    health_before = count("http", "/healthz", "200")
    async with aiohttp.ClientSession() as session:  # one keep-alive connection
        url = mesh.http_url + "/v1/recommend"
        async with session.post(url, json={"user_id": "u1"}, headers={"x-api-key": "acme-key"}):
            pass
        async with session.post(url, json={"user_id": "u1"}) as response:
            assert response.status == 401
        async with session.get(mesh.http_url + "/healthz") as response:
            assert response.status == 200
    after = count("http", "/v1/recommend", "401")
    assert {t: v - before.get(t, 0.0) for t, v in after.items() if v != before.get(t)} == {"-": 1.0}
    health = count("http", "/healthz", "200")
    assert {t for t, v in health.items() if v != health_before.get(t)} == {"-"}

    grpc_before = count("grpc", "Recommend", "UNAUTHENTICATED")
    async with open_channel(mesh.addr("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        await stub.Recommend(
            gateway_pb2.RecommendRequest(user_id="u1"), metadata=[("x-api-key", "acme-key")]
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Recommend(gateway_pb2.RecommendRequest(user_id="u1"))
    grpc_after = count("grpc", "Recommend", "UNAUTHENTICATED")
    assert {t for t, v in grpc_after.items() if v != grpc_before.get(t)} == {"-"}
