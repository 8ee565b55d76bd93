"""The user view read on the request path (:class:`UserViewReader`) against a real Valkey:
what it reads, and which failures feed its breaker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest

from core import keys
from mesh import redis as mesh_redis
from mesh.context import Budget, budget_var
from mesh.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from mesh.ports import free_port
from mesh.redis import AsyncRedis
from mesh.resilience import AsyncBreaker
from services.runtime.user_view import UserViewReader


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[AsyncRedis]:
    client = mesh_redis.connect(redis_url)
    yield client
    await client.aclose()


def reader(client: AsyncRedis, breaker: AsyncBreaker | None = None) -> UserViewReader:
    return UserViewReader(client, history_limit=3, cap_s=1.0, breaker=breaker)


async def materialised(client: AsyncRedis) -> str:
    """A tenant with a two-wide user view, user ``u1`` and its history."""
    tenant = "uv" + uuid.uuid4().hex[:8]
    await client.hset(keys.meta(tenant), "user_default", np.zeros(2, "<f4").tobytes())
    await client.set(keys.user_row(tenant, "u1"), np.array([1.5, -2.0], "<f4").tobytes())
    await client.rpush(keys.history(tenant, "u1"), 10, 11, 12)
    await client.rpush(keys.outcomes(tenant, "u1"), 13, 14)
    return tenant


async def test_a_known_user_is_its_row_and_newest_history(store: AsyncRedis) -> None:
    tenant = await materialised(store)
    user = await reader(store).read(tenant, "u1")
    assert user.features.tolist() == [1.5, -2.0] and not user.is_default
    assert user.history == [12, 13, 14]  # materialised, then projected outcomes; newest 3
    stranger = await reader(store).read(tenant, "nobody")
    assert stranger.is_default and stranger.features.tolist() == [0.0, 0.0]


async def test_a_tenant_without_views_fails_the_read_but_not_the_breaker(
    store: AsyncRedis,
) -> None:
    guarded = reader(store)
    for _ in range(10):
        with pytest.raises(FailedPrecondition):
            await guarded.read("never" + uuid.uuid4().hex[:8], "u1")
    assert guarded.breaker.state == "closed"  # one tenant's setup does not cut off the rest


async def test_a_spent_request_budget_reads_nothing(store: AsyncRedis) -> None:
    tenant = await materialised(store)
    guarded = reader(store)
    token = budget_var.set(Budget(0.001))
    try:
        with pytest.raises(DeadlineExceeded):
            await guarded.read(tenant, "u1")
    finally:
        budget_var.reset(token)
    assert guarded.breaker.state == "closed"


async def test_an_unreachable_store_opens_the_breaker() -> None:
    client = mesh_redis.connect(f"redis://127.0.0.1:{free_port()}/0")
    guarded = reader(client, AsyncBreaker("feature-store-test", fail_max=2))
    try:
        for _ in range(2):
            with pytest.raises(Unavailable, match="feature store unreachable"):
                await guarded.read("t", "u1")
        assert guarded.breaker.state == "open"
        with pytest.raises(Unavailable, match="circuit to feature-store-test is open"):
            await guarded.read("t", "u1")
    finally:
        await client.aclose()
