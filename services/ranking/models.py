"""The ranking models of one artifact set: pre-ranker (numpy), heavy ranker (ONNX), and the
set's item features they were trained with (memory-mapped), so a request reads the rows of
the set's items without a call and a hot swap changes models and rows together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from core.artifacts import load_artifact_set
from core.prerank import load_prerank, prerank_scores
from mesh.errors import ArtifactError, ConfigError
from services.runtime.models import check_same_width, check_set_contract, loading, open_onnx

F32 = npt.NDArray[np.float32]


def parse_head_weights(spec: str, heads: list[str]) -> F32:
    """Weights in ``heads`` order from ``"click=1.0,conversion=2.0"``; unnamed heads get 0.

    Raises:
        ConfigError: a name is not a head of the model, or a weight is not a number.
    """
    weights = np.zeros(len(heads), dtype=np.float32)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in heads:
            raise ConfigError(f"head weight {name!r} names no ranker head (heads: {heads})")
        try:
            weights[heads.index(name)] = float(value)
        except ValueError as exc:
            raise ConfigError(f"head weight {part!r} is not name=number") from exc
    return weights


class RankingModels:
    """Pre-ranker and heavy ranker loaded from the artifact set at ``path``.

    Loading is blocking (hashing, ONNX); the hot swap runs it off the event loop.

    Raises:
        ArtifactError: (from loading) a file is missing, corrupt or the wrong shape; the
            message names the file.
        ConfigError: ``head_weights`` name a head the set's ranker does not have.
    """

    def __init__(self, path: Path, head_weights: str) -> None:
        artifacts = load_artifact_set(path)
        self.path = artifacts.path
        self.version = artifacts.version
        prerank_path = artifacts.file("prerank")
        self.prerank = load_prerank(prerank_path)
        self.ranker_path = artifacts.file("ranker")
        self.ranker = open_onnx(self.ranker_path)
        check_set_contract(artifacts, {"ranker": self.ranker})
        self.user_dim = int(artifacts.config["user_feature_dim"])
        self.item_dim = int(artifacts.config["item_feature_dim"])
        user_proj, item_proj = self.prerank["user_proj"], self.prerank["item_proj"]
        if user_proj.shape[0] != self.user_dim or item_proj.shape[0] != self.item_dim:
            raise ArtifactError(
                f"{prerank_path}: projections take {user_proj.shape[0]} user and "
                f"{item_proj.shape[0]} item features, but the set's config says "
                f"{self.user_dim} and {self.item_dim}"
            )
        self.heads: list[str] = list(artifacts.config["ranker_heads"])
        self.head_weights = parse_head_weights(head_weights, self.heads)
        self.item_features: F32 = artifacts.open_array("item_features")
        self.item_categories: npt.NDArray[np.int32] = artifacts.open_array("item_categories")
        n_items = self.item_features.shape[0]
        if self.item_features.shape != (n_items, self.item_dim) or self.item_categories.shape != (
            n_items,
        ):
            raise ArtifactError(
                f"{artifacts.file('item_features')}: shape {self.item_features.shape} with "
                f"{self.item_categories.shape[0]} categories; the set's config says "
                f"{self.item_dim} features per item"
            )

    @property
    def n_items(self) -> int:
        """Items of the set: ids ``0 .. n_items - 1`` have rows in :attr:`item_features`."""
        return int(self.item_features.shape[0])

    @classmethod
    def replacing(
        cls, path: Path, served: RankingModels, head_weights: str, warm_rows: int
    ) -> RankingModels:
        """The set at ``path``, checked against the ``served`` one and warmed up (blocking).

        Raises:
            ArtifactError: the set is corrupt, inconsistent, or cannot take the served set's
                place (other feature widths).
            ConfigError: ``head_weights`` name a head the new ranker does not have.
        """
        candidate = cls(path, head_weights)
        for what, new, old in (
            ("user features", candidate.user_dim, served.user_dim),
            ("item features", candidate.item_dim, served.item_dim),
        ):
            check_same_width(candidate.ranker_path, what, new, old, served.version)
        candidate.warm_up(warm_rows)
        return candidate

    def warm_up(self, rows: int) -> None:
        """Score ``rows`` blank candidates once, so the first request does not pay set-up costs.

        Raises:
            ArtifactError: the ranker fails on blank candidates.
        """
        user = np.zeros(self.user_dim, dtype=np.float32)
        items = np.zeros((rows, self.item_dim), dtype=np.float32)
        self.prerank_scores(user, items)
        with loading(self.ranker_path):
            self.heavy_scores(user, items)

    def prerank_scores(self, user: F32, items: F32) -> F32:
        """Cheap score of each item row for the user."""
        return prerank_scores(self.prerank, user, items)

    def heavy_scores(self, user: F32, items: F32) -> F32:
        """Combined multi-task score (head probabilities weighted) of each item row."""
        users = np.broadcast_to(user, (items.shape[0], user.size))
        (heads,) = self.ranker.run(
            ["scores"],
            {"user_features": np.ascontiguousarray(users), "item_features": items},
        )
        return np.asarray(heads, dtype=np.float32) @ self.head_weights
