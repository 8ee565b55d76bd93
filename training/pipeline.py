"""The end-to-end training pipeline: world -> models -> export -> index -> eval -> artifact set.

:func:`train` is the one entry point, used by ``python -m training train``, the ``recmesh``
CLI and test fixtures. It builds every file of the artifact contract (see
:mod:`core.artifacts`) in a hidden build directory under ``root``, evaluates them
(unless disabled), moves them into a new version directory and points ``current`` at it.
The same config (seeds included) yields the same models and metrics on the same machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
import onnxruntime
import scipy
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from core.artifacts import REQUIRED_FILES, ArtifactSet, set_current, write_artifact_set
from core.prerank import save_prerank
from mesh.errors import ArtifactError
from training.evaluate import EvalConfig, evaluate
from training.export import (
    ItemTowerGraph,
    export_item_tower,
    export_ranker,
    export_user_tower,
    verify_item_embeddings,
)
from training.features import (
    category_codes,
    click_column,
    item_tower_inputs,
    user_feature_matrix,
)
from training.index import build_index, write_index
from training.model_card import MODEL_CARD, write_model_card
from training.prerank import PrerankConfig, train_prerank
from training.ranker import (
    HEADS,
    RankerConfig,
    RankerTrace,
    RankingExamples,
    ranking_examples,
    train_ranker,
)
from training.two_tower import TwoTowerConfig, embed, train_two_tower
from training.world import World, WorldConfig, generate_world

PHASES = ("world", "two_tower", "ranker", "prerank", "export", "index", "evaluate", "write")
EXPORT_SAMPLE = 256
"""Rows used to verify each ONNX export against torch."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything :func:`train` needs.

    ``two_tower``, ``ranker`` and ``prerank`` are the models' hyper-parameters (None: the
    tuned defaults of their config classes); ``epochs``, when set, overrides all three
    models' epochs (tests use 1 for speed)."""

    n_users: int = 5000
    n_items: int = 20000
    n_categories: int = 50
    data_seed: int = 0
    train_seed: int = 0
    epochs: int | None = None
    evaluate: bool = True
    progress: bool = True
    eval_users: int = 2000
    two_tower: TwoTowerConfig | None = None
    ranker: RankerConfig | None = None
    prerank: PrerankConfig | None = None
    user_history: bool = True
    """Append the history summary to the user vectors (off only for ablations)."""
    mtl_report: bool = False
    """Also measure the ranker's multi-task and unbiased-learning diagnostics
    (:mod:`training.mtl`) into the manifest's ``config.mtl_report`` (about 3 more ranker
    trainings, and gradient cosines traced while the shipped ranker trains)."""

    def model_configs(self) -> tuple[TwoTowerConfig, RankerConfig, PrerankConfig]:
        """The three models' configs, ``epochs`` applied."""
        two_tower = self.two_tower or TwoTowerConfig()
        ranker = self.ranker or RankerConfig()
        prerank = self.prerank or PrerankConfig()
        if self.epochs is None:
            return two_tower, ranker, prerank
        return (
            dataclasses.replace(two_tower, epochs=self.epochs),
            dataclasses.replace(ranker, epochs=self.epochs),
            dataclasses.replace(prerank, epochs=self.epochs),
        )

    def world_config(self) -> WorldConfig:
        """The world this config trains on (sizes and ``data_seed``)."""
        return WorldConfig(
            n_users=self.n_users,
            n_items=self.n_items,
            n_categories=self.n_categories,
            seed=self.data_seed,
        )


def train(root: Path, config: TrainConfig) -> Path:
    """Build, evaluate and publish a new artifact set under ``root``; returns its directory,
    which ``root/current`` now points at. Wall time per phase lands in the manifest's
    ``timings_s``."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    two_tower_cfg, ranker_cfg, prerank_cfg = config.model_configs()
    eval_cfg = EvalConfig(max_users=config.eval_users, seed=config.data_seed)
    world_cfg = config.world_config()
    seed = config.train_seed
    root.mkdir(parents=True, exist_ok=True)
    with (
        tqdm(total=len(PHASES), desc="pipeline", disable=not config.progress) as bar,
        tempfile.TemporaryDirectory(dir=root, prefix=".build-") as build_dir,
    ):
        build = Path(build_dir)
        with _phase("world", timings, bar):
            world = generate_world(world_cfg)
            user_x = user_feature_matrix(world, history=config.user_history)
            codes = category_codes(world)
        with _phase("two_tower", timings, bar):
            item_inputs = item_tower_inputs(
                world, codes if two_tower_cfg.category_one_hot else None
            )
            two_tower = train_two_tower(
                user_x,
                item_inputs,
                world.train,
                world.item_categories,
                two_tower_cfg,
                seed=seed,
                progress=config.progress,
                clicks_column=click_column(world),
            )
            item_embeddings = embed(two_tower.item_tower, item_inputs)
            del item_inputs
        with _phase("ranker", timings, bar):
            clicks = click_column(world) if ranker_cfg.leave_one_out else None
            examples = ranking_examples(world.train, ranker_cfg.exploration_weight, clicks=clicks)
            trace = RankerTrace() if config.mtl_report else None
            ranker = train_ranker(
                user_x,
                world.item_features,
                examples,
                ranker_cfg,
                seed=seed,
                codes=codes if ranker_cfg.category_one_hot else None,
                progress=config.progress,
                trace=trace,
            )
        with _phase("prerank", timings, bar):
            prerank = train_prerank(
                user_x,
                world.item_features,
                examples,
                prerank_cfg,
                seed=seed,
                progress=config.progress,
            )
        files = {name: build / file_name for name, file_name in REQUIRED_FILES.items()}
        with _phase("export", timings, bar):
            sample = export_sample(examples.users.size, seed)
            sample_users = user_x[examples.users[sample]]
            sample_items = world.item_features[examples.items[sample]]
            export_user_tower(two_tower.user_tower, files["user_tower"], sample_users)
            export_ranker(ranker, files["ranker"], sample_users, sample_items)
            sample_ids = examples.items[sample]
            sample_categories = world.item_categories[sample_ids].astype(np.int64)
            served_item_tower = ItemTowerGraph(
                two_tower.item_tower,
                int(codes.codes.shape[0]),
                one_hot=two_tower_cfg.category_one_hot,
            )
            export_item_tower(
                served_item_tower, files["item_tower"], sample_items, sample_categories
            )
            verify_item_embeddings(
                files["item_tower"], sample_items, sample_categories, item_embeddings[sample_ids]
            )
            save_prerank(files["prerank"], prerank)
            _save_data(world, user_x, item_embeddings, files)
        with _phase("index", timings, bar):
            index, ann_spec = build_index(item_embeddings)
            write_index(index, files["ann_index"])
        with _phase("evaluate", timings, bar):
            metrics = evaluate(world, files, HEADS, eval_cfg) if config.evaluate else {}
        report: dict[str, Any] | None = None
        if trace is not None:
            from training.mtl import mtl_report

            mark = time.perf_counter()
            report = mtl_report(
                world,
                user_x,
                codes,
                files,
                eval_cfg,
                ranker_cfg,
                trace,
                seed=seed,
                progress=config.progress,
            )
            timings["mtl_report"] = round(time.perf_counter() - mark, 3)
        with _phase("write", timings, bar):
            manifest_config: dict[str, Any] = {
                "n_users": world.config.n_users,
                "n_items": world.config.n_items,
                "n_categories": world.config.n_categories,
                "user_feature_dim": int(user_x.shape[1]),
                "item_feature_dim": int(world.item_features.shape[1]),
                "embedding_dim": two_tower_cfg.embedding_dim,
                "user_id_format": "u{row}",
                "ranker_heads": list(HEADS),
                "ranker_head_weights": dict(eval_cfg.head_weights),
                "prerank_rank": prerank_cfg.rank,
                "ann": ann_spec.to_manifest(),
                "epochs": {
                    "two_tower": two_tower_cfg.epochs,
                    "ranker": ranker_cfg.epochs,
                    "prerank": prerank_cfg.epochs,
                },
                "evaluation": eval_cfg.to_manifest(),
                "world": dataclasses.asdict(world_cfg),
                "two_tower": dataclasses.asdict(two_tower_cfg),
                "ranker": dataclasses.asdict(ranker_cfg),
                "prerank": dataclasses.asdict(prerank_cfg),
                "training_data": training_data(world, examples),
            }
            if report is not None:
                manifest_config["mtl_report"] = report
            files["model_card"] = build / MODEL_CARD
            write_model_card(files["model_card"], manifest_config, metrics)
            timings["total"] = round(time.perf_counter() - started, 3)
            version_dir = write_artifact_set(
                root,
                files,
                seeds={"data": config.data_seed, "train": config.train_seed},
                config=manifest_config,
                metrics=metrics,
                libraries=library_versions(),
                timings_s=timings,
            )
        set_current(root, version_dir.name)
    return version_dir


def reevaluate(artifact_set: ArtifactSet) -> dict[str, float]:
    """Recompute the metrics of a built set from its files, on the world regenerated from
    its manifest (``config.world``, or the sizes and ``seeds.data`` of older manifests) with
    the manifest's evaluation settings. Equal to the stored ``metrics`` of a set built by
    :func:`train` with evaluation on, on the same machine and library versions."""
    world, eval_cfg = world_of(artifact_set)
    paths = artifact_set.paths
    user_rows = int(np.load(paths["user_features"], mmap_mode="r").shape[0])
    if user_rows != world.config.n_users:
        raise ArtifactError(
            f"{paths['user_features']}: {user_rows} users, but the manifest's world has "
            f"{world.config.n_users}"
        )
    heads = tuple(str(h) for h in artifact_set.config["ranker_heads"])
    return evaluate(world, paths, heads, eval_cfg)


def world_of(artifact_set: ArtifactSet) -> tuple[World, EvalConfig]:
    """The world a set was trained on, regenerated from its manifest (``config.world``, or
    the sizes and ``seeds.data`` of older manifests), and its evaluation settings."""
    config = artifact_set.config
    if "world" in config:
        world_cfg = WorldConfig(**config["world"])
    else:
        world_cfg = WorldConfig(
            n_users=int(config["n_users"]),
            n_items=int(config["n_items"]),
            n_categories=int(config["n_categories"]),
            seed=int(artifact_set.manifest["seeds"]["data"]),
        )
    eval_entry = config.get("evaluation", {})
    if "seed" not in eval_entry:
        eval_entry = {**eval_entry, "seed": world_cfg.seed}
    return generate_world(world_cfg), EvalConfig.from_manifest(eval_entry)


def export_sample(n: int, seed: int) -> NDArray[np.int64]:
    """Rows of the training examples used to verify the ONNX exports (a seeded sample, so
    both logged and exploration impressions are covered)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, EXPORT_SAMPLE), replace=False)).astype(np.int64)


def _save_data(
    world: World,
    user_features: NDArray[np.float32],
    item_embeddings: NDArray[np.float32],
    files: dict[str, Path],
) -> None:
    """Write the array files that come from the world, the pipeline's features and the
    item tower."""
    clicks = world.train.select(world.train.clicked)
    counts = world.train_click_counts().astype(np.float64)
    per_user = np.bincount(clicks.users, minlength=world.config.n_users)
    held = world.heldout.select(world.heldout.clicked)
    np.save(files["item_embeddings"], item_embeddings.astype(np.float32))
    np.save(files["user_features"], user_features)
    np.save(files["item_features"], world.item_features)
    np.save(files["item_categories"], world.item_categories.astype(np.int32))
    np.save(files["item_popularity"], (counts / max(counts.sum(), 1.0)).astype(np.float32))
    np.savez(
        files["user_history"],
        indptr=np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64),
        items=clicks.items.astype(np.int64),
    )
    np.savez(
        files["heldout"],
        users=held.users.astype(np.int64),
        items=held.items.astype(np.int64),
        converted=held.converted,
    )


def library_versions() -> dict[str, str]:
    """Versions of the libraries (and Python) that built a set, for its manifest."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def training_data(world: World, examples: RankingExamples) -> dict[str, Any]:
    """The manifest's ``config.training_data``: what the models were trained on (the
    world's seed and size, the train impressions' counts, and a sha256 over the ranker's
    examples: users, items, labels, weights and per-row item values)."""
    digest = hashlib.sha256()
    for array in (examples.users, examples.items, examples.labels, examples.weights):
        digest.update(np.ascontiguousarray(array).tobytes())
    if examples.item_values is not None:
        digest.update(np.ascontiguousarray(examples.item_values).tobytes())
    train = world.train
    return {
        "source": "world",
        "data_seed": world.config.seed,
        "train_impressions": len(train),
        "train_clicks": int(train.clicked.sum()),
        "train_conversions": int(train.converted.sum()),
        "exploration_impressions": int(train.explored.sum()),
        "heldout_impressions": len(world.heldout),
        "ranker_examples_sha256": digest.hexdigest(),
        "ranker_item_column": examples.item_column,
    }


@contextmanager
def _phase(name: str, timings: dict[str, float], bar: tqdm) -> Iterator[None]:
    """Time one pipeline phase into ``timings[name]`` and advance the progress bar."""
    bar.set_description(name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    bar.update()
