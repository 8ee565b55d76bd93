"""Shared fixtures: one tiny, real artifact set built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.pipeline import TrainConfig, train

TINY = TrainConfig(
    n_users=400, n_items=2000, n_categories=20, epochs=1, progress=False, eval_users=300
)


@pytest.fixture(scope="session")
def tiny_config() -> TrainConfig:
    """The tiny training config (a few seconds of training)."""
    return TINY


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifacts root holding one set trained with :data:`TINY` (current points at it)."""
    root = tmp_path_factory.mktemp("artifacts")
    train(root, TINY)
    return root
