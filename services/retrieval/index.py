"""The retrieval models: user tower, item tower, ANN index and popularity list of one
artifact set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from core.artifacts import load_artifact_set
from mesh.errors import ArtifactError, InvalidArgument
from services.runtime.models import check_same_width, check_set_contract, loading, open_onnx

POPULAR_LIST = 2000
ITEM_TOWER_CATEGORIES = "n_categories"
"""Metadata property of ``item_tower.onnx``: how many categories its one-hot covers
(categories ``0..n-1``; written by :func:`training.export.export_item_tower`)."""
UNKNOWN_CATEGORY = -1
"""The category to pass for an item whose category the item tower was not trained on: its
one-hot is all zeros, so the embedding comes from the features alone (the graph's own
behaviour for a category it does not know, asked for explicitly)."""


@dataclass(frozen=True)
class Candidates:
    """Parallel arrays: ``ids[i]`` has ``scores[i]`` and came from ``sources[i]``."""

    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    sources: npt.NDArray[np.int32]


class RetrievalModels:
    """Everything retrieval serves from one artifact set, loaded and checked once.

    Loading is blocking (hashing, ONNX, FAISS); the hot swap runs it off the event loop.

    Raises:
        ArtifactError: (from loading) a file is missing, corrupt or the wrong shape; the
            message names the file.
    """

    def __init__(self, path: Path) -> None:
        artifacts = load_artifact_set(path)
        self.path = artifacts.path
        self.version = artifacts.version
        self.tower_path = artifacts.file("user_tower")
        self.user_tower = open_onnx(self.tower_path)
        self.item_tower_path = artifacts.file("item_tower")
        self.item_tower = open_onnx(self.item_tower_path)
        check_set_contract(
            artifacts, {"user_tower": self.user_tower, "item_tower": self.item_tower}
        )
        self.user_dim = int(artifacts.config["user_feature_dim"])
        self.item_dim = int(artifacts.config["item_feature_dim"])
        self.n_categories = _item_tower_categories(self.item_tower, self.item_tower_path)
        # One query per request: OpenMP threads only contend with the event loop
        # (measured 15 ms with 2 threads vs 0.4 ms with 1 for flat IP over 20k items).
        faiss.omp_set_num_threads(1)
        self.index_path = index_path = artifacts.file("ann_index")
        with loading(index_path):
            self.index = faiss.read_index(str(index_path))
        embedding_dim = int(artifacts.config["embedding_dim"])
        if self.index.d != embedding_dim:
            raise ArtifactError(
                f"{index_path}: index holds {self.index.d}-d vectors, but the user tower "
                f"returns {embedding_dim}-d embeddings"
            )
        nprobe = artifacts.config.get("ann", {}).get("nprobe")
        if nprobe is not None and hasattr(self.index, "nprobe"):
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        popularity_path = artifacts.file("item_popularity")
        with loading(popularity_path):
            popularity = np.load(popularity_path)
        if popularity.ndim != 1 or popularity.size != self.index.ntotal:
            raise ArtifactError(
                f"{popularity_path}: shape {popularity.shape}, but the index "
                f"({index_path.name}) holds {self.index.ntotal} items"
            )
        order = np.argsort(-popularity, kind="stable")[:POPULAR_LIST]
        self.popular_ids = order.astype(np.int64)
        self.popular_scores = popularity[order].astype(np.float32)

    @classmethod
    def replacing(cls, path: Path, served: RetrievalModels, warm_k: int) -> RetrievalModels:
        """The set at ``path``, checked against the ``served`` one and warmed up (blocking).

        Raises:
            ArtifactError: the set is corrupt, inconsistent, or cannot take the served set's
                place (another user feature width).
        """
        candidate = cls(path)
        check_same_width(
            candidate.tower_path,
            "user features",
            candidate.user_dim,
            served.user_dim,
            served.version,
        )
        candidate.warm_up(warm_k)
        return candidate

    def warm_up(self, k: int) -> None:
        """Run the tower and the index once, so the first request does not pay their lazy set-up.

        Raises:
            ArtifactError: the tower or the index fails on a blank user.
        """
        with loading(self.tower_path):
            embedding = self.embed(np.zeros(self.user_dim, dtype=np.float32))
        with loading(self.index_path):
            self.search(embedding, k)
        with loading(self.item_tower_path):
            self.embed_items(
                np.zeros((1, self.item_dim), dtype=np.float32), np.zeros(1, dtype=np.int64)
            )

    def embed(self, user_features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The user's L2-normalised embedding, shape ``[1, D]``."""
        out = self.user_tower.run(None, {"user_features": user_features.reshape(1, -1)})
        return np.asarray(out[0], dtype=np.float32)

    def embed_items(
        self, features: npt.NDArray[np.float32], categories: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        """The items' L2-normalised embeddings ``[B, D]`` from the set's item tower, in the
        space of the set's ``item_embeddings`` and ANN index (a set item's own features and
        category give its shipped row, within the export tolerance of 1e-4).

        Args:
            features: float32 ``[B, item_dim]`` item feature rows, finite.
            categories: integer ``[B]`` categories, each in ``0..n_categories - 1`` or
                :data:`UNKNOWN_CATEGORY`.

        Raises:
            InvalidArgument: wrong shapes, a non-finite feature, or a category the item tower
                was not trained on other than :data:`UNKNOWN_CATEGORY` (``field`` names the
                input at fault). Checked before the model runs, which would quietly give any
                unknown category a zero one-hot.
        """
        x = np.asarray(features)
        c = np.asarray(categories)
        if x.ndim != 2 or x.shape[1] != self.item_dim:
            raise InvalidArgument(
                f"item features must be [batch, {self.item_dim}], got {list(x.shape)}",
                field="features",
            )
        if c.ndim != 1 or c.shape[0] != x.shape[0]:
            raise InvalidArgument(
                f"categories must be [{x.shape[0]}] (one per item), got {list(c.shape)}",
                field="categories",
            )
        if c.size and not np.issubdtype(c.dtype, np.integer):
            raise InvalidArgument(f"categories must be integers, got {c.dtype}", field="categories")
        if not np.isfinite(x).all():
            raise InvalidArgument("item features must be finite", field="features")
        outside = (c >= self.n_categories) | ((c < 0) & (c != UNKNOWN_CATEGORY))
        if c.size and bool(outside.any()):
            bad = int(c[outside][0])
            raise InvalidArgument(
                f"category {bad} is outside the item tower's 0..{self.n_categories - 1} "
                f"(artifact set {self.version}); {UNKNOWN_CATEGORY} embeds an item without one",
                field="categories",
            )
        if x.shape[0] == 0:
            return np.zeros((0, self.index.d), dtype=np.float32)
        inputs = {
            "item_features": np.ascontiguousarray(x, dtype=np.float32),
            "item_category": np.ascontiguousarray(c, dtype=np.int64),
        }
        out = self.item_tower.run(None, inputs)
        return np.asarray(out[0], dtype=np.float32)

    def search(
        self, embedding: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top ``k`` items by inner product, best first (ids of -1 dropped)."""
        scores, ids = self.index.search(embedding, k)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)


def _item_tower_categories(session: ort.InferenceSession, path: Path) -> int:
    """The category count the item tower's one-hot covers, from its metadata.

    Raises:
        ArtifactError: the property is missing or not a positive integer.
    """
    value = session.get_modelmeta().custom_metadata_map.get(ITEM_TOWER_CATEGORIES)
    try:
        count = int(value) if value is not None else 0
    except ValueError:
        count = 0
    if count < 1:
        raise ArtifactError(
            f"{path}: metadata property {ITEM_TOWER_CATEGORIES!r} must be a positive integer, "
            f"got {value!r}"
        )
    return count


def merge(
    lists: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], int]],
    seen: npt.NDArray[np.int64],
) -> Candidates:
    """The ``(ids, scores, source)`` lists one after the other, each id once (the first
    list that has it wins), seen ids removed."""
    ids = np.concatenate([found for found, _, _ in lists])
    scores = np.concatenate([scored for _, scored, _ in lists]).astype(np.float32, copy=False)
    sources = np.concatenate([np.full(found.size, source, np.int32) for found, _, source in lists])
    _, first = np.unique(ids, return_index=True)
    keep = np.zeros(ids.size, dtype=bool)
    keep[first] = True
    keep &= ~np.isin(ids, seen)
    return Candidates(ids[keep], scores[keep], sources[keep])
