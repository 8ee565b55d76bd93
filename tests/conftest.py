"""Session fixtures: a real Redis-protocol server and a real (tiny) artifact set."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mesh.ports import free_port
from ops.redis_server import start_embedded_redis

if TYPE_CHECKING:
    from tests.inprocess import Mesh


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an embedded Valkey server started for this test session."""
    base = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = start_embedded_redis(base / "data", port, base / "redis.log")
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
