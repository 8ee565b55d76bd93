"""The set's item tower as retrieval serves it: the shipped embeddings from features and
categories, bad input refused before the model runs, a malformed tower refused at load."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.artifacts import MANIFEST, resolve_current
from mesh.errors import ArtifactError, InvalidArgument
from services.retrieval.index import UNKNOWN_CATEGORY, RetrievalModels

TOLERANCE = 1e-4
"""The export's tolerance (training.export.TOLERANCE)."""


@pytest.fixture(scope="module")
def models(artifacts_root: Path) -> RetrievalModels:
    return RetrievalModels(resolve_current(artifacts_root))


def test_item_tower_gives_the_shipped_embeddings(models: RetrievalModels) -> None:
    features = np.load(models.path / "item_features.npy")
    categories = np.load(models.path / "item_categories.npy").astype(np.int64)
    shipped = np.load(models.path / "item_embeddings.npy")
    assert models.n_categories == int(categories.max()) + 1
    got = models.embed_items(features, categories)
    assert got.shape == shipped.shape and got.dtype == np.float32
    assert np.abs(got - shipped).max() <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Any batch size, int32 categories too; an empty batch gives an empty answer.
    one = models.embed_items(features[7:8], categories[7:8].astype(np.int32))
    assert np.abs(one - shipped[7:8]).max() <= TOLERANCE
    assert models.embed_items(features[:0], categories[:0]).shape == (0, shipped.shape[1])
    # The category is an input of the model, not only a feature column.
    other = (categories[:50] + 1) % models.n_categories
    assert np.abs(models.embed_items(features[:50], other) - shipped[:50]).max() > 1e-3


def test_an_item_without_a_known_category_is_embedded_from_its_features(
    models: RetrievalModels,
) -> None:
    """UNKNOWN_CATEGORY (-1) is the zero one-hot: a unit vector, the same for any batch,
    unlike every trained category's."""
    features = np.load(models.path / "item_features.npy")[:4]
    none = np.full(4, UNKNOWN_CATEGORY, np.int64)
    got = models.embed_items(features, none)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(models.embed_items(features[2:3], none[:1]), got[2:3], atol=1e-6)
    for category in range(models.n_categories):
        known = models.embed_items(features, np.full(4, category, np.int64))
        assert np.abs(known - got).max() > 1e-3


@pytest.mark.parametrize(
    ("features", "categories", "field", "message"),
    [
        ("narrow", "ok", "features", "must be \\[batch, "),
        ("ok", "short", "categories", "one per item"),
        ("ok", "too_big", "categories", "category 20 is outside the item tower's 0..19"),
        ("ok", "negative", "categories", "category -2 is outside"),
        ("ok", "float", "categories", "must be integers"),
        ("nan", "ok", "features", "finite"),
    ],
)
def test_bad_items_are_refused_before_the_model_runs(
    models: RetrievalModels, features: str, categories: str, field: str, message: str
) -> None:
    assert models.n_categories == 20  # the session set's categories
    x = np.zeros((3, models.item_dim), np.float32)
    c = np.array([0, 1, 2], np.int64)
    xs = {"ok": x, "narrow": x[:, :-1], "nan": np.where(np.eye(3, models.item_dim), np.nan, x)}
    cs = {
        "ok": c,
        "short": c[:2],
        "too_big": np.array([0, 20, 1]),
        "negative": np.array([0, -2, 1]),
        "float": c.astype(np.float32),
    }
    with pytest.raises(InvalidArgument, match=message) as caught:
        models.embed_items(xs[features].astype(np.float32), cs[categories])
    assert caught.value.field == field


def _replace_item_tower(directory: Path, model: onnx.ModelProto) -> None:
    path = directory / "item_tower.onnx"
    onnx.save(model, str(path))
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"]["item_tower"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _tower(item_dim: int, category_type: int, n_categories: str | None) -> onnx.ModelProto:
    """A valid ONNX item tower (a matmul; the category is cast and added) whose category
    input has ``category_type`` and whose metadata says ``n_categories``."""
    weights = np.zeros((item_dim, 64), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["item_features", "w"], ["m"]),
            helper.make_node("Cast", ["item_category"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["c", "axis"], ["c2"]),
            helper.make_node("Add", ["m", "c2"], ["item_embedding"]),
        ],
        "tower",
        [
            helper.make_tensor_value_info("item_features", TensorProto.FLOAT, ["batch", item_dim]),
            helper.make_tensor_value_info("item_category", category_type, ["batch"]),
        ],
        [helper.make_tensor_value_info("item_embedding", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([1]), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if n_categories is not None:
        helper.set_model_props(model, {"n_categories": n_categories})
    return model


@pytest.mark.parametrize(
    ("category_type", "n_categories", "reason"),
    [
        (TensorProto.FLOAT, "20", "'input item_category' is tensor\\(float\\) of shape"),
        (TensorProto.INT64, None, "metadata property 'n_categories' must be a positive integer"),
        (TensorProto.INT64, "many", "got 'many'"),
    ],
)
def test_a_malformed_item_tower_is_refused(
    models: RetrievalModels,
    tmp_path: Path,
    category_type: int,
    n_categories: str | None,
    reason: str,
) -> None:
    copy = tmp_path / models.path.name
    shutil.copytree(models.path, copy)
    _replace_item_tower(copy, _tower(models.item_dim, category_type, n_categories))
    with pytest.raises(ArtifactError, match=f"item_tower.onnx: .*{reason}"):
        RetrievalModels(copy)


def test_a_set_without_an_item_tower_is_refused(models: RetrievalModels, tmp_path: Path) -> None:
    """Sets built before the item tower shipped lack the file: refused, naming it."""
    copy = tmp_path / models.path.name
    shutil.copytree(models.path, copy)
    (copy / "item_tower.onnx").unlink()
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"]["item_tower"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lacks required files: item_tower"):
        RetrievalModels(copy)
