"""End to end: a tiny real training run yields a loadable set that honours the contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pytest

from core.artifacts import (
    MANIFEST,
    REQUIRED_FILES,
    ArtifactSet,
    list_versions,
    load_artifact_set,
    resolve_current,
    rollback,
    set_current,
)
from core.prerank import load_prerank, prerank_pair_scores, prerank_scores
from training.__main__ import main
from training.bench import main as bench_main
from training.export import N_CATEGORIES_KEY, TOLERANCE
from training.features import history_buckets
from training.pipeline import TrainConfig, reevaluate, train

REQUIRED_METRICS = (
    "retrieval.recall@100",
    "retrieval.popularity_recall@100",
    "retrieval.oracle_recall@100",
    "ann.recall@100_vs_exact",
    "ranking.ndcg@10.prerank",
    "ranking.ndcg@10.heavy",
    "ranking.ndcg@10.oracle",
    "ranking.auc.click",
    "ranking.auc.conversion",
)


@pytest.fixture(scope="module")
def tiny_set(tiny_root: Path) -> ArtifactSet:
    return load_artifact_set(resolve_current(tiny_root))


def test_manifest_describes_the_set(tiny_set: ArtifactSet, tiny_config: TrainConfig) -> None:
    m = tiny_set.manifest
    assert m["seeds"] == {"data": tiny_config.data_seed, "train": tiny_config.train_seed}
    c = m["config"]
    expected = (tiny_config.n_users, tiny_config.n_items, tiny_config.n_categories)
    assert (c["n_users"], c["n_items"], c["n_categories"]) == expected
    assert c["ranker_heads"] == ["click", "conversion"]
    world = c["world"]
    assert (world["n_users"], world["n_items"], world["seed"]) == (
        tiny_config.n_users,
        tiny_config.n_items,
        tiny_config.data_seed,
    )
    history = history_buckets(tiny_config.n_categories)
    assert c["user_feature_dim"] == world["user_feature_dim"] + history
    assert c["item_feature_dim"] == world["item_feature_dim"]
    assert c["evaluation"]["max_users"] == tiny_config.eval_users
    assert c["epochs"] == {"two_tower": 1, "ranker": 1, "prerank": 1}
    assert c["ann"]["type"] == "flat_ip" and c["ann"]["metric"] == "inner_product"
    assert set(m["files"]) == {*REQUIRED_FILES, "model_card"}
    assert set(m["libraries"]) >= {"torch", "onnxruntime", "faiss", "numpy"}
    for key in REQUIRED_METRICS:
        assert 0.0 <= tiny_set.metrics[key] <= 1.0, key
    assert tiny_set.metrics["ann.recall@100_vs_exact"] == pytest.approx(1.0)


def test_metrics_are_consistent(tiny_set: ArtifactSet) -> None:
    """Relations that hold by construction of the evaluation, whatever the models learnt."""
    m = tiny_set.metrics
    assert m["ranking.ndcg@10.oracle"] == pytest.approx(1.0)
    for k in (50, 100, 500):
        assert m[f"retrieval.oracle_recall@{k}"] >= m[f"retrieval.recall@{k}"]
        assert m[f"retrieval.oracle_recall@{k}"] >= m[f"retrieval.popularity_recall@{k}"]
    assert m["retrieval.recall@50"] <= m["retrieval.recall@100"] <= m["retrieval.recall@500"]
    for name in ("prerank", "heavy", "feature_oracle", "retrieval", "random"):
        assert 0.0 < m[f"ranking.ndcg@10.{name}"] <= m["ranking.ndcg@10.oracle"], name
    # Even one epoch on a tiny world learns something.
    assert m["retrieval.recall@100"] > m["retrieval.popularity_recall@100"]
    assert m["ranking.ndcg@10.heavy"] > m["ranking.ndcg@10.random"]
    assert m["ranking.auc.click"] > 0.6


def test_eval_reproduces_the_stored_metrics(
    tiny_root: Path, tiny_set: ArtifactSet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reevaluate(tiny_set) == tiny_set.metrics
    argv = ["eval", "--root", str(tiny_root), "--version", tiny_set.version, "--check"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert tiny_set.version in out and "all metrics equal the stored ones" in out
    assert "retrieval.recall@100" in out
    assert main(["eval", "--root", str(tiny_root), "--version", "no-such-version"]) == 1
    assert "no-such-version" in capsys.readouterr().err


def test_eval_check_flags_a_stored_metric_that_differs(
    tiny_set: ArtifactSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "artifacts"
    copy = root / tiny_set.version
    shutil.copytree(tiny_set.path, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["metrics"]["retrieval.recall@100"] += 0.25
    (copy / MANIFEST).write_text(json.dumps(manifest))
    set_current(root, tiny_set.version)
    assert main(["eval", "--root", str(root)]) == 0
    assert main(["eval", "--root", str(root), "--check"]) == 2
    out = capsys.readouterr().out
    assert "differ from the stored ones: retrieval.recall@100" in out


def test_user_tower_runs_with_declared_shapes(tiny_set: ArtifactSet) -> None:
    c = tiny_set.config
    session = ort.InferenceSession(str(tiny_set.file("user_tower")))
    [inp], [out] = session.get_inputs(), session.get_outputs()
    assert inp.name == "user_features" and inp.shape[1] == c["user_feature_dim"]
    assert out.name == "user_embedding" and out.shape[1] == c["embedding_dim"]
    users = np.asarray(tiny_set.open_array("user_features")[:5])
    emb = session.run(None, {"user_features": users})[0]
    assert emb.shape == (5, c["embedding_dim"]) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # The ANN index over item embeddings answers with item ids, best first.
    items = tiny_set.open_array("item_embeddings")
    assert items.shape == (c["n_items"], c["embedding_dim"]) and items.dtype == np.float32
    index = faiss.read_index(str(tiny_set.file("ann_index")))
    assert index.ntotal == c["n_items"]
    scores, ids = index.search(emb, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(emb @ items.T, ids, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_item_tower_reproduces_the_shipped_item_embeddings(tiny_set: ArtifactSet) -> None:
    """``item_tower.onnx`` on every item's features and category gives its row of
    ``item_embeddings.npy`` within the export tolerance: a new item embedded at serving
    time lands in the same space as the set's items."""
    c = tiny_set.config
    session = ort.InferenceSession(str(tiny_set.file("item_tower")))
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("item_features", "tensor(float)"),
        ("item_category", "tensor(int64)"),
    ]
    assert session.get_inputs()[0].shape[1] == c["item_feature_dim"]
    assert session.get_outputs()[0].shape[1] == c["embedding_dim"]
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[N_CATEGORIES_KEY] == str(c["n_categories"])
    features = np.asarray(tiny_set.open_array("item_features"))
    categories = np.asarray(tiny_set.open_array("item_categories")).astype(np.int64)
    got = session.run(None, {"item_features": features, "item_category": categories})[0]
    shipped = np.asarray(tiny_set.open_array("item_embeddings"))
    assert np.abs(got - shipped).max() <= TOLERANCE


def test_ranker_and_prerank_score_candidates(tiny_set: ArtifactSet) -> None:
    c = tiny_set.config
    users = np.asarray(tiny_set.open_array("user_features"))
    items = np.asarray(tiny_set.open_array("item_features"))
    assert users.shape == (c["n_users"], c["user_feature_dim"])
    assert items.shape == (c["n_items"], c["item_feature_dim"])
    session = ort.InferenceSession(str(tiny_set.file("ranker")))
    batch = {"user_features": np.repeat(users[:1], 50, axis=0), "item_features": items[:50]}
    scores = session.run(None, batch)[0]
    assert scores.shape == (50, len(c["ranker_heads"])) and scores.dtype == np.float32
    assert ((scores > 0) & (scores < 1)).all()

    model = load_prerank(tiny_set.file("prerank"))
    pre = prerank_scores(model, users[0], items[:50])
    assert pre.shape == (50,) and pre.dtype == np.float32
    explicit = (users[0] @ model["user_proj"]) @ (items[:50] @ model["item_proj"]).T
    np.testing.assert_allclose(pre, explicit + items[:50] @ model["item_bias"], rtol=1e-4)
    paired = prerank_pair_scores(model, batch["user_features"], batch["item_features"])
    np.testing.assert_allclose(pre, paired, rtol=1e-4, atol=1e-5)


def test_data_files_are_consistent(tiny_set: ArtifactSet) -> None:
    c = tiny_set.config
    categories = tiny_set.open_array("item_categories")
    assert categories.dtype == np.int32 and categories.shape == (c["n_items"],)
    popularity = tiny_set.open_array("item_popularity")
    assert popularity.dtype == np.float32 and popularity.sum() == pytest.approx(1.0, abs=1e-4)
    history = tiny_set.open_npz("user_history")
    indptr, items = history["indptr"], history["items"]
    assert indptr.dtype == items.dtype == np.int64
    assert indptr.shape == (c["n_users"] + 1,) and indptr[-1] == items.size
    assert (np.diff(indptr) >= 0).all() and items.max() < c["n_items"]
    # Popularity is the normalised count of exactly these train clicks.
    counts = np.bincount(items, minlength=c["n_items"])
    np.testing.assert_allclose(popularity, counts / counts.sum(), rtol=1e-5)
    heldout = tiny_set.open_npz("heldout")
    assert heldout["users"].max() < c["n_users"] and heldout["items"].max() < c["n_items"]


def test_same_seeds_same_metrics_and_rollback(
    tiny_root: Path, tiny_set: ArtifactSet, tiny_config: TrainConfig
) -> None:
    again = load_artifact_set(train(tiny_root, tiny_config))
    assert again.version != tiny_set.version
    assert resolve_current(tiny_root) == again.path
    assert again.metrics == tiny_set.metrics
    # the audit trail too: what the models were trained on, and the card
    assert again.config["training_data"] == tiny_set.config["training_data"]
    for name in ("item_embeddings", "prerank", "user_features", "model_card"):
        same = again.manifest["files"][name]["sha256"]
        assert same == tiny_set.manifest["files"][name]["sha256"], name
    assert list_versions(tiny_root) == [tiny_set.version, again.version]
    assert rollback(tiny_root) == tiny_set.path
    assert resolve_current(tiny_root) == tiny_set.path


def test_services_can_import_without_torch() -> None:
    code = (
        "import sys, core.artifacts, core.prerank, training.index, training.bench;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_reports_serving_timings(
    tiny_set: ArtifactSet, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tiny_set.path.parent
    assert bench_main(["--root", str(root), "--version", tiny_set.version, "--queries", "30"]) == 0
    out = capsys.readouterr().out
    for line in ("index_load_s", "ann_ms         k=500", "user_tower_ms", "verify_s"):
        assert line in out
