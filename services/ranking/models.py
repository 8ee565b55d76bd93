"""The ranking models of one artifact set: pre-ranker (numpy) and heavy ranker (ONNX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from mesh.errors import ConfigError
from services.models import onnx_session
from training.artifacts import load_artifact_set
from training.prerank_model import load_prerank, prerank_scores

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

    Raises:
        ArtifactError: (from loading) a file is missing, corrupt or the wrong shape.
    """

    def __init__(self, path: Path, head_weights: str) -> None:
        artifacts = load_artifact_set(path)
        self.version = artifacts.version
        self.prerank = load_prerank(artifacts.file("prerank"))
        self.ranker = onnx_session(str(artifacts.file("ranker")))
        inputs = {i.name: i.shape for i in self.ranker.get_inputs()}
        self.user_dim = int(inputs["user_features"][1])
        self.item_dim = int(inputs["item_features"][1])
        self.heads: list[str] = list(artifacts.manifest["config"]["ranker_heads"])
        self.head_weights = parse_head_weights(head_weights, self.heads)

    def warm_up(self, rows: int) -> None:
        """Score ``rows`` blank candidates once, so the first request does not pay set-up costs."""
        user = np.zeros(self.user_dim, dtype=np.float32)
        items = np.zeros((rows, self.item_dim), dtype=np.float32)
        self.prerank_scores(user, items)
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
