"""Pre-ranker scoring in numpy only (no torch): services import this module.

The pre-ranker is a low-rank bilinear model over dense features::

    score(u, x) = (u @ user_proj) . (x @ item_proj) + x @ item_bias

with ``user_proj`` float32 ``[U, R]``, ``item_proj`` float32 ``[I, R]`` and ``item_bias``
float32 ``[I]``. Scores are logits of a click; only their order matters to callers. For one
user and N items the cost is ``O(N * I)``: the user side folds into one weight vector.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from mesh.errors import ArtifactError

PRERANK_ARRAYS: tuple[str, ...] = ("user_proj", "item_proj", "item_bias")
"""Names of the arrays in ``prerank.npz``."""


def prerank_scores(
    model_arrays: Mapping[str, NDArray[np.float32]],
    user_vec: NDArray[np.float32],
    item_matrix: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Scores ``float32 [N]`` of one user ``user_vec [U]`` against ``item_matrix [N, I]``."""
    user_side = user_vec @ model_arrays["user_proj"]  # [R]
    weights = model_arrays["item_proj"] @ user_side + model_arrays["item_bias"]  # [I]
    return (item_matrix @ weights).astype(np.float32, copy=False)


def load_prerank(path: Path) -> dict[str, NDArray[np.float32]]:
    """Load and shape-check ``prerank.npz``; raises ``ArtifactError`` naming the file."""
    try:
        with np.load(path) as npz:
            arrays = {name: np.asarray(npz[name], dtype=np.float32) for name in PRERANK_ARRAYS}
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read pre-ranker arrays: {exc}") from exc
    user_proj, item_proj, item_bias = (arrays[name] for name in PRERANK_ARRAYS)
    if (
        user_proj.ndim != 2
        or item_proj.ndim != 2
        or user_proj.shape[1] != item_proj.shape[1]
        or item_bias.shape != (item_proj.shape[0],)
    ):
        raise ArtifactError(
            f"{path}: inconsistent shapes user_proj {user_proj.shape}, "
            f"item_proj {item_proj.shape}, item_bias {item_bias.shape}"
        )
    return arrays


def prerank_pair_scores(
    model_arrays: Mapping[str, NDArray[np.float32]],
    user_matrix: NDArray[np.float32],
    item_matrix: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Scores ``float32 [N]`` of aligned pairs ``(user_matrix[k] [U], item_matrix[k] [I])``."""
    user_side = user_matrix @ model_arrays["user_proj"]
    item_side = item_matrix @ model_arrays["item_proj"]
    scores = np.einsum("nr,nr->n", user_side, item_side) + item_matrix @ model_arrays["item_bias"]
    return np.asarray(scores, dtype=np.float32)


def save_prerank(path: Path, model_arrays: Mapping[str, NDArray[np.float32]]) -> None:
    """Write the arrays of :data:`PRERANK_ARRAYS` to ``path`` (``.npz``)."""
    np.savez(
        path,
        user_proj=np.asarray(model_arrays["user_proj"], dtype=np.float32),
        item_proj=np.asarray(model_arrays["item_proj"], dtype=np.float32),
        item_bias=np.asarray(model_arrays["item_bias"], dtype=np.float32),
    )
