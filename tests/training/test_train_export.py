"""ONNX export: onnxruntime agrees with torch within 1e-4 at any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mesh.errors import ArtifactError
from training.export import (
    N_CATEGORIES_KEY,
    TOLERANCE,
    ItemTowerGraph,
    export_item_tower,
    export_ranker,
    export_user_tower,
    verify_item_embeddings,
    verify_onnx,
)
from training.features import CategoryCodes
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


@pytest.mark.parametrize("one_hot", [True, False])
def test_item_tower_onnx_builds_the_one_hot_itself(tmp_path: Path, one_hot: bool) -> None:
    """The served item tower takes the category as an int64 and equals the tower on the
    features followed by the one-hot (the training inputs) within TOLERANCE."""
    n_categories = 7
    torch.manual_seed(0)
    tower = Tower(ITEM_DIM + (n_categories if one_hot else 0), 32, EMB_DIM, 0).eval()
    path = tmp_path / "item_tower.onnx"
    rng = np.random.default_rng(2)
    sample = _features(64, ITEM_DIM, 1), rng.integers(0, n_categories, 64).astype(np.int64)
    export_item_tower(ItemTowerGraph(tower, n_categories, one_hot=one_hot), path, *sample)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [(i.name, i.shape, i.type) for i in session.get_inputs()]
    assert inputs == [
        ("item_features", ["batch", ITEM_DIM], "tensor(float)"),
        ("item_category", ["batch"], "tensor(int64)"),
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("item_embedding", ["batch", EMB_DIM])
    ]
    assert session.get_modelmeta().custom_metadata_map[N_CATEGORIES_KEY] == str(n_categories)
    for batch in (1, 300):
        x = _features(batch, ITEM_DIM, batch)
        c = rng.integers(0, n_categories, batch).astype(np.int64)
        got = session.run(None, {"item_features": x, "item_category": c})[0]
        training_inputs = x
        if one_hot:
            training_inputs = np.concatenate([x, np.eye(n_categories, dtype=np.float32)[c]], 1)
        with torch.no_grad():
            want = tower(torch.from_numpy(training_inputs)).numpy()
        assert got.shape == (batch, EMB_DIM)
        assert np.abs(got - want).max() <= TOLERANCE
        assert verify_item_embeddings(path, x, c, want) <= TOLERANCE
    with pytest.raises(ArtifactError, match=r"item_tower\.onnx: differs from the item emb"):
        verify_item_embeddings(path, x, c, want + 0.01)


def _codes(n_categories: int, seed: int) -> CategoryCodes:
    """Category codes in columns 4..11 of the item features."""
    table = np.random.default_rng(seed).standard_normal((n_categories, 8)).astype(np.float32)
    return CategoryCodes(start=4, codes=table)


def _items_with_categories(n: int, codes: CategoryCodes, seed: int) -> np.ndarray:
    """Item features whose category block holds a code, like the world's."""
    items = _features(n, ITEM_DIM, seed)
    categories = np.random.default_rng(seed).integers(0, codes.codes.shape[0], size=n)
    items[:, codes.start : codes.stop] = codes.codes[categories]
    return items


@pytest.mark.parametrize(
    ("codes", "wide_rank"), [(None, 64), (_codes(12, 5), 64), (_codes(12, 5), 0)]
)
def test_ranker_onnx_matches_torch(
    tmp_path: Path, codes: CategoryCodes | None, wide_rank: int
) -> None:
    """The multi-task ranker, with and without the in-graph category decoder and the wide
    part, agrees with torch within TOLERANCE on both heads at any batch size."""
    torch.manual_seed(0)
    config = RankerConfig(wide_rank=wide_rank)
    ranker = MultiTaskRanker(USER_DIM, ITEM_DIM, config, codes).eval()
    path = tmp_path / "ranker.onnx"
    sample_codes = codes or _codes(3, 1)
    export_ranker(
        ranker, path, _features(64, USER_DIM, 1), _items_with_categories(64, sample_codes, 2)
    )

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["user_features", "item_features"]
    assert [o.name for o in session.get_outputs()] == ["scores"]
    for batch in (1, 333):
        u, x = _features(batch, USER_DIM, 3), _items_with_categories(batch, sample_codes, 4)
        got = session.run(None, {"user_features": u, "item_features": x})[0]
        with torch.no_grad():
            want = ranker(torch.from_numpy(u), torch.from_numpy(x)).numpy()
        assert got.shape == (batch, len(HEADS)) and got.dtype == np.float32
        assert ((got >= 0) & (got <= 1)).all()
        assert (got[:, 1] <= got[:, 0] + 1e-7).all()  # P(click and conversion) <= P(click)
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
