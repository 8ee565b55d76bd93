"""``train --from-log``: a new artifact set whose ranker learnt from a tenant's event log.

:func:`train_from_log` reads the tenant's log from Redis and builds one example per logged
impression (:func:`training.log_data.read_examples`: labels joined by request and item, the
user's history as of the impression's append time, dense features from the base set), and
then:

1. splits the examples by log order: the latest ``heldout_share`` (whole answers) are held
   out, the earlier ones train;
2. trains the heavy ranker on the training part with :func:`training.ranker.train_ranker`
   (the base set's user rows, the set's default row for unknown users, its item rows;
   impressions of the exploration source weigh ``exploration_weight`` like in the world's
   training, and each impression its inverse logged propensity, clipped and
   self-normalised, ``ipw_clip``), exports it to ONNX (verified against torch);
3. evaluates it and the base set's ranker on the held-out impressions (per-head AUC:
   ``log.auc.*`` and ``log.base_auc.*``) and, unless disabled, on the synthetic world the
   base set was trained on (the same metrics as ``train``, so ``eval`` re-checks them);
4. writes a new set: every file of the base set but ``ranker.onnx`` (hard-linked, or
   copied across file systems), the new ranker, and a manifest whose ``config.from_log``
   says which data made it (tenant, the snapshot it started from when the log was trimmed,
   first and last log position read, entry, impression and example counts, positives, the
   base version, a digest of the examples), and points ``current`` at it, as ``train``
   does, when its held-out click AUC is at least the base ranker's (:func:`promoted`).

The retrieval models, the pre-ranker and the feature files are the base set's: the log
holds only what was shown, which is no training set for retrieval, and the served user and
item rows stay those the features were computed with (as of the base set's training cut,
which is not in the log: no label of the log leaks through them). The ranker's served
inputs are those rows, so the as-of history travels with the examples for the models that
take history (retrieval's seen filter reads it at serving time); the ranker does not.

It refuses (``FailedPrecondition``) a log with fewer than ``min_impressions`` usable
impressions, or without a click in either part.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from recmesh.common.v1 import common_pb2

from core.artifacts import REQUIRED_FILES, ArtifactSet, set_current, write_artifact_set
from mesh.errors import FailedPrecondition
from mesh.redis import BlockingRedis
from mesh.settings import history_cap, port_of, redis_url
from training.evaluate import evaluate
from training.export import export_ranker
from training.features import codes_of
from training.log_data import LABELS, LogExamples, read_examples
from training.metrics import auc
from training.model_card import MODEL_CARD, write_model_card
from training.pipeline import export_sample, library_versions, world_of
from training.ranker import (
    HEADS,
    RankerConfig,
    RankingExamples,
    ipw_weights,
    train_ranker,
)

MIN_STEPS_PER_EPOCH = 100
"""The ranker's batch shrinks (down to 64) until an epoch has this many steps: the tuned
batch of 2048 fits the world's 400k impressions, a log of a few thousand would train
a handful of steps."""


@dataclass(frozen=True)
class LogSettings:
    """Environment of ``train --from-log`` and ``simulate-serve``: the Redis holding the
    log, the history cap the projector applies (``RECMESH_FEATURE_HISTORY_CAP``) and the
    events service's port on this host."""

    redis_url: str = redis_url()
    history_cap: int = history_cap()
    events_port: int = port_of("events")


@dataclass(frozen=True)
class FromLogConfig:
    """What :func:`train_from_log` needs besides the log and the base set."""

    tenant: str = "demo"
    history_cap: int = 200
    heldout_share: float = 0.2
    min_impressions: int = 1000
    train_seed: int = 0
    epochs: int | None = None
    """The ranker's epochs (None: its tuned default)."""
    ranker: RankerConfig | None = None
    """None: the tuned defaults with the batch sized to the log (:func:`ranker_config`)."""
    evaluate_world: bool = True
    progress: bool = True
    ipw_clip: float | None = None
    """Weight each training impression by its inverse logged propensity, clipped at this
    multiple of the mean weight and self-normalised (:func:`training.ranker.ipw_weights`,
    the weighting ``train --mtl-report`` measures on the world; ``--ipw-clip``, e.g.
    :data:`training.ranker.IPW_CLIP`); None: unweighted, like the world-trained ranker
    (IPW towards uniform exposure costs held-out AUC on logged traffic: docs/models.md).
    A log with a propensity of 0 or less among the training impressions trains unweighted."""
    promote_if_worse: bool = False
    """Point ``current`` at the new set even when its held-out click AUC is below the base
    ranker's on the same impressions (by default such a set is written, not served)."""


def ranker_config(n_examples: int, config: FromLogConfig) -> RankerConfig:
    """The ranker's hyper-parameters for ``n_examples`` training examples."""
    if config.ranker is not None:
        chosen = config.ranker
    else:
        base = RankerConfig()
        batch = min(base.batch_size, max(64, n_examples // MIN_STEPS_PER_EPOCH))
        chosen = dataclasses.replace(base, batch_size=batch)
    if config.epochs is not None:
        chosen = dataclasses.replace(chosen, epochs=config.epochs)
    return chosen


def train_from_log(
    root: Path, base: ArtifactSet, client: BlockingRedis, config: FromLogConfig
) -> Path:
    """Read ``config.tenant``'s log through ``client`` and :func:`train_on_examples`."""
    started = time.perf_counter()
    examples = read_examples(
        client,
        config.tenant,
        n_users=int(base.open_array("user_features").shape[0]),
        item_categories=base.open_array("item_categories", mmap=False),
        history_cap=config.history_cap,
    )
    return train_on_examples(
        root, base, examples, config, {"read": round(time.perf_counter() - started, 3)}
    )


def train_on_examples(
    root: Path,
    base: ArtifactSet,
    examples: LogExamples,
    config: FromLogConfig,
    timings: dict[str, float] | None = None,
) -> Path:
    """Train, evaluate and publish the set of the module docstring from ``examples`` (built
    against ``base``); returns its directory, which ``root/current`` now points at when
    :func:`promoted`.

    Raises:
        FailedPrecondition: too few impressions, or no click in the training or the
            held-out part.
    """
    if LABELS != HEADS:
        raise AssertionError(f"label columns {LABELS} are not the ranker's heads {HEADS}")
    timings = dict(timings or {})
    started = time.perf_counter() - sum(timings.values())
    counts = examples.counts
    if len(examples) < config.min_impressions:
        raise FailedPrecondition(
            f"tenant {config.tenant!r}: the log has {len(examples)} usable impressions "
            f"({counts.entries} entries, {counts.impressions} impressions, "
            f"{counts.unknown_items} of items outside set {base.version}); training from the "
            f"log needs at least {config.min_impressions}"
        )
    cut = examples.heldout_start(config.heldout_share)
    train_part, held_part = np.arange(cut), np.arange(cut, len(examples))
    for name, part in (("training", train_part), ("held-out", held_part)):
        clicks = int(examples.labels[part, 0].sum())
        if clicks == 0:
            raise FailedPrecondition(
                f"tenant {config.tenant!r}: no click among the {part.size} {name} impressions "
                f"of the log (examples in log order, the latest {config.heldout_share:.0%} "
                f"held out): nothing to learn or to measure"
            )
    users = np.asarray(base.open_array("user_features"), dtype=np.float32)
    user_x = np.ascontiguousarray(np.vstack([users, users.mean(axis=0, keepdims=True)]))
    item_x = np.ascontiguousarray(base.open_array("item_features", mmap=False), dtype=np.float32)
    categories = base.open_array("item_categories", mmap=False)
    rows = np.where(examples.user_rows < 0, users.shape[0], examples.user_rows)
    ranker_cfg = ranker_config(train_part.size, config)
    weights = np.where(
        examples.sources == common_pb2.SOURCE_EXPLORE, ranker_cfg.exploration_weight, 1.0
    ).astype(np.float32)
    logged = examples.propensities[train_part]
    weighted = config.ipw_clip is not None and logged.size > 0 and bool(np.all(logged > 0))
    if weighted and config.ipw_clip is not None:
        weights[train_part] *= ipw_weights(logged, config.ipw_clip)
    training = RankingExamples(
        users=rows[train_part],
        items=examples.items[train_part],
        labels=examples.labels[train_part],
        weights=weights[train_part],
    )
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as build_dir:
        build = Path(build_dir)
        mark = time.perf_counter()
        ranker = train_ranker(
            user_x,
            item_x,
            training,
            ranker_cfg,
            seed=config.train_seed,
            codes=codes_of(item_x, categories) if ranker_cfg.category_one_hot else None,
            progress=config.progress,
        )
        timings["ranker"] = round(time.perf_counter() - mark, 3)
        mark = time.perf_counter()
        files = _base_files(base, build)
        sample = export_sample(training.users.size, config.train_seed)
        export_ranker(
            ranker,
            files["ranker"],
            user_x[training.users[sample]],
            item_x[training.items[sample]],
        )
        timings["export"] = round(time.perf_counter() - mark, 3)
        mark = time.perf_counter()
        held_users, held_items = user_x[rows[held_part]], item_x[examples.items[held_part]]
        held_labels = examples.labels[held_part] > 0.5
        metrics: dict[str, float] = {}
        for prefix, path in (("log.auc", files["ranker"]), ("log.base_auc", base.file("ranker"))):
            scores = _ranker_scores(path, held_users, held_items)
            for h, head in enumerate(HEADS):
                value = auc(scores[:, h], held_labels[:, h])
                if not np.isnan(value):
                    metrics[f"{prefix}.{head}"] = value
        if config.evaluate_world:
            world, eval_cfg = world_of(base)
            metrics.update(evaluate(world, files, HEADS, eval_cfg))
        timings["evaluate"] = round(time.perf_counter() - mark, 3)
        manifest_config: dict[str, Any] = {
            **base.config,
            "ranker": dataclasses.asdict(ranker_cfg),
            "epochs": {**base.config.get("epochs", {}), "ranker": ranker_cfg.epochs},
            "from_log": {
                **lineage(examples, cut, base, config),
                "ipw_clip": config.ipw_clip if weighted else None,
            },
        }
        files["model_card"] = build / MODEL_CARD
        write_model_card(files["model_card"], manifest_config, metrics)
        timings["total"] = round(time.perf_counter() - started, 3)
        version_dir = write_artifact_set(
            root,
            files,
            seeds={"data": int(base.manifest["seeds"]["data"]), "train": config.train_seed},
            config=manifest_config,
            metrics=metrics,
            libraries=library_versions(),
            timings_s=timings,
        )
    if promoted(metrics, config):
        set_current(root, version_dir.name)
    return version_dir


def promoted(metrics: dict[str, float], config: FromLogConfig) -> bool:
    """Whether a set with ``metrics`` goes live: its held-out click AUC is at least the
    base ranker's on the same logged impressions, or ``config.promote_if_worse``. A model
    the log says is worse stays on disk for a look, and serving keeps the base set."""
    mine, theirs = metrics.get("log.auc.click"), metrics.get("log.base_auc.click")
    return config.promote_if_worse or mine is None or theirs is None or mine >= theirs


def lineage(
    examples: LogExamples, cut: int, base: ArtifactSet, config: FromLogConfig
) -> dict[str, Any]:
    """The manifest's ``config.from_log``: which log, which part of it, what it held."""
    counts = examples.counts
    train, held = examples.labels[:cut], examples.labels[cut:]
    return {
        "tenant": examples.tenant,
        "base_version": base.version,
        "snapshot_position": counts.snapshot_position,
        "first_position": counts.first_position,
        "last_position": counts.last_position,
        "heldout_from_position": examples.log_positions[cut] if cut < len(examples) else "",
        "entries": counts.entries,
        "not_applied": counts.not_applied,
        "impressions": counts.impressions,
        "unknown_items": counts.unknown_items,
        "unknown_users": counts.unknown_users,
        "outcomes": counts.outcomes,
        "unmatched_outcomes": counts.unmatched_outcomes,
        "outcomes_before_impression": counts.outcomes_before_impression,
        "examples": {"train": int(cut), "heldout": int(len(examples) - cut)},
        "positives": {
            "train": {h: int(train[:, k].sum()) for k, h in enumerate(LABELS)},
            "heldout": {h: int(held[:, k].sum()) for k, h in enumerate(LABELS)},
        },
        "mean_propensity": float(examples.propensities.mean()) if len(examples) else 0.0,
        "history_cap": config.history_cap,
        "heldout_share": config.heldout_share,
        "examples_sha256": examples.digest(),
    }


def _base_files(base: ArtifactSet, build: Path) -> dict[str, Path]:
    """Every required file of ``base`` in ``build`` (hard links, copies across file
    systems) except the ranker, whose path there is returned unwritten."""
    files = {name: build / file_name for name, file_name in REQUIRED_FILES.items()}
    for name, target in files.items():
        if name == "ranker":
            continue
        source = base.file(name)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return files


def _ranker_scores(
    path: Path, users: NDArray[np.float32], items: NDArray[np.float32]
) -> NDArray[np.float32]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"user_features": users, "item_features": items})
    return np.asarray(out[0], dtype=np.float32)
