"""ONNX export: onnxruntime agrees with torch within 1e-4 at any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mesh.errors import ArtifactError
from training.export import TOLERANCE, export_ranker, export_user_tower, verify_onnx
from training.ranker import HEADS, MultiTaskRanker, RankerConfig
from training.two_tower import Tower

USER_DIM, ITEM_DIM, EMB_DIM = 24, 20, 16


def _features(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_user_tower_onnx_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = Tower(USER_DIM, 32, EMB_DIM).eval()
    path = tmp_path / "user_tower.onnx"
    export_user_tower(tower, path, _features(64, USER_DIM, 1))
    assert not list(tmp_path.glob("*.data"))  # weights are inside the .onnx file

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [inp], [out] = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1], inp.type) == ("user_features", USER_DIM, "tensor(float)")
    assert (out.name, out.shape[1]) == ("user_embedding", EMB_DIM)
    assert isinstance(inp.shape[0], str)  # dynamic batch
    for batch in (1, 7, 300):
        x = _features(batch, USER_DIM, batch)
        got = session.run(None, {"user_features": x})[0]
        with torch.no_grad():
            want = tower(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, EMB_DIM)
        assert np.abs(got - want).max() <= TOLERANCE
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("item_dim", [USER_DIM, ITEM_DIM])
def test_ranker_onnx_matches_torch(tmp_path: Path, item_dim: int) -> None:
    """Both with equal widths (adds the elementwise u * x block) and without."""
    torch.manual_seed(0)
    ranker = MultiTaskRanker(USER_DIM, item_dim, RankerConfig()).eval()
    path = tmp_path / "ranker.onnx"
    export_ranker(ranker, path, _features(64, USER_DIM, 1), _features(64, item_dim, 2))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["user_features", "item_features"]
    assert [o.name for o in session.get_outputs()] == ["scores"]
    for batch in (1, 333):
        u, x = _features(batch, USER_DIM, 3), _features(batch, item_dim, 4)
        got = session.run(None, {"user_features": u, "item_features": x})[0]
        with torch.no_grad():
            want = ranker(torch.from_numpy(u), torch.from_numpy(x)).numpy()
        assert got.shape == (batch, len(HEADS))
        assert ((got >= 0) & (got <= 1)).all()
        assert np.abs(got - want).max() <= TOLERANCE


def test_verification_fails_loudly_when_models_disagree(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = Tower(USER_DIM, 32, EMB_DIM).eval()
    path = tmp_path / "user_tower.onnx"
    export_user_tower(tower, path, _features(8, USER_DIM, 1))
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.5)
    with pytest.raises(ArtifactError, match=r"user_tower\.onnx"):
        verify_onnx(tower, path, {"user_features": _features(8, USER_DIM, 1)})
