"""The retrieval models: user tower, ANN index and popularity list of one artifact set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from core.artifacts import load_artifact_set
from mesh.errors import ArtifactError
from services.runtime.models import check_same_width, check_set_contract, loading, open_onnx

POPULAR_LIST = 2000


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
        check_set_contract(artifacts, {"user_tower": self.user_tower})
        self.user_dim = int(artifacts.config["user_feature_dim"])
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

    def embed(self, user_features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The user's L2-normalised embedding, shape ``[1, D]``."""
        out = self.user_tower.run(None, {"user_features": user_features.reshape(1, -1)})
        return np.asarray(out[0], dtype=np.float32)

    def search(
        self, embedding: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top ``k`` items by inner product, best first (ids of -1 dropped)."""
        scores, ids = self.index.search(embedding, k)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)


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
