"""Session fixtures: a real Redis-protocol server and a real (tiny) artifact set.

Every test that uses ``redis_url`` (itself or through another fixture, such as ``mesh``)
is marked ``redis``. With ``RECMESH_TEST_REDIS=cluster`` that URL names a Valkey Cluster of
three masters instead of one server (``make test-cluster`` runs ``-m redis`` that way).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mesh.context import tenant_var
from mesh.ports import free_port
from ops.redis_server import start_embedded_cluster, start_embedded_redis, stop_processes

if TYPE_CHECKING:
    from tests.inprocess import Mesh

REDIS_MODE_ENV = "RECMESH_TEST_REDIS"
"""``single`` (the default: one server) or ``cluster`` (three masters): what ``redis_url``
names."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``redis`` every test that talks to Redis (it uses ``redis_url``)."""
    for item in items:
        if "redis_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(autouse=True)
def no_tenant_left_behind() -> Iterator[None]:
    """Every test starts and ends without a tenant in the main context: a sync test that
    admits a key or sets ``tenant_var`` would otherwise leave it to every later test, whose
    calls then name that tenant (the mesh's client interceptor sends it)."""
    token = tenant_var.set("")
    yield
    tenant_var.reset(token)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an embedded Valkey started for this test session: one server, or a cluster
    of three masters (``redis+cluster://...``) when ``RECMESH_TEST_REDIS=cluster``."""
    mode = os.environ.get(REDIS_MODE_ENV, "single")
    if mode not in ("single", "cluster"):
        raise pytest.UsageError(f"{REDIS_MODE_ENV} is single or cluster, not {mode!r}")
    base = tmp_path_factory.mktemp("redis")
    if mode == "cluster":
        url, processes = start_embedded_cluster(base, masters=3)
    else:
        port = free_port()
        processes = [start_embedded_redis(base / "data", port, base / "redis.log")]
        url = f"redis://127.0.0.1:{port}/0"
    try:
        yield url
    finally:
        stop_processes(processes)


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding ``current`` -> a small world trained for real by the training pipeline."""
    from training.pipeline import TrainConfig, train

    root = tmp_path_factory.mktemp("artifacts")
    train(
        root,
        TrainConfig(
            n_users=500, n_items=2000, n_categories=20, epochs=1, evaluate=False, progress=False
        ),
    )
    return root


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """The whole mesh in-process with the test tenants (``tests.inprocess``), one per module.
    A module that needs another shape of mesh defines its own ``mesh`` fixture."""
    from tests.inprocess import inprocess_mesh, write_tenants

    tenants = write_tenants(tmp_path_factory.mktemp("mesh") / "tenants.json")
    async with inprocess_mesh(redis_url, artifacts_root, tenants) as running:
        yield running
