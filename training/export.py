"""ONNX export of the user tower, the item tower and the ranker, verified against torch.

Contract of the written files (services depend on it):

* user tower: input ``user_features`` float32 ``[B, U]``, output ``user_embedding``
  float32 ``[B, D]`` (L2-normalised).
* item tower: inputs ``item_features`` float32 ``[B, I]`` and ``item_category`` int64
  ``[B]``, output ``item_embedding`` float32 ``[B, D]`` (L2-normalised). The graph builds
  the category one-hot itself (:class:`ItemTowerGraph`), so serving passes the category
  as an integer; the model's metadata property :data:`N_CATEGORIES_KEY` says how many
  categories it was trained on (a category outside ``0..n-1`` gets an all-zero one-hot in
  the graph: serving refuses such categories before running the model, but for -1, its
  explicit "no known category").
* ranker: inputs ``user_features`` float32 ``[B, U]`` and ``item_features`` float32
  ``[B, I]``, output ``scores`` float32 ``[B, H]`` probabilities in head order.

``B`` is a dynamic dimension. Weights are embedded in the ``.onnx`` file (no external data
file). Each export re-runs the file in onnxruntime on the given sample inputs (at full
size and at batch size 1) and raises ``ArtifactError`` naming the file when any output
differs from torch by more than :data:`TOLERANCE`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import nn

from mesh.errors import ArtifactError
from training.ranker import MultiTaskRanker
from training.two_tower import Tower

TOLERANCE = 1e-4
"""Largest allowed absolute difference between onnxruntime and torch outputs."""
N_CATEGORIES_KEY = "n_categories"
"""Metadata property of ``item_tower.onnx``: the categories its one-hot covers."""


class ItemTowerGraph(nn.Module):
    """The item tower as served: ``(item_features [B, I], item_category [B]) -> [B, D]``.

    With ``one_hot`` the tower's input is the features followed by the category's one-hot
    over ``n_categories`` (what :func:`training.features.item_tower_inputs` builds in
    numpy); without it (a tower trained on the features alone) the category is accepted and
    ignored, so every set's item tower has the same inputs.
    """

    categories: torch.Tensor

    def __init__(self, tower: Tower, n_categories: int, *, one_hot: bool) -> None:
        super().__init__()
        self.tower = tower
        self.one_hot = one_hot
        self.n_categories = n_categories
        self.register_buffer(
            "categories", torch.arange(n_categories, dtype=torch.int64), persistent=False
        )

    def forward(self, item_features: torch.Tensor, item_category: torch.Tensor) -> torch.Tensor:
        if self.one_hot:
            hot = item_category[:, None] == self.categories[None, :]
            inputs = torch.cat([item_features, hot.to(item_features.dtype)], dim=1)
        else:
            # Keeps the input in the graph (the exporter drops unused inputs).
            inputs = item_features + 0 * item_category[:, None].to(item_features.dtype)
        embedding: torch.Tensor = self.tower(inputs)
        return embedding


def export_user_tower(tower: Tower, path: Path, sample: NDArray[np.float32]) -> None:
    """Write ``tower`` to ``path`` and verify it on ``sample [B, U]``."""
    _export(tower, path, {"user_features": sample}, "user_embedding")


def export_item_tower(
    graph: ItemTowerGraph,
    path: Path,
    features: NDArray[np.float32],
    categories: NDArray[np.int64],
) -> None:
    """Write the served item tower ``graph`` to ``path``, with its category count as the
    metadata property :data:`N_CATEGORIES_KEY`, and verify it on aligned samples
    ``features [B, I]`` and ``categories [B]``."""
    inputs: dict[str, NDArray[Any]] = {
        "item_features": features,
        "item_category": categories.astype(np.int64),
    }
    _export(graph, path, inputs, "item_embedding")
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {N_CATEGORIES_KEY: str(graph.n_categories)})
    onnx.save(model, str(path))


def export_ranker(
    ranker: MultiTaskRanker,
    path: Path,
    user_sample: NDArray[np.float32],
    item_sample: NDArray[np.float32],
) -> None:
    """Write ``ranker`` to ``path`` and verify it on aligned samples ``[B, U]``, ``[B, I]``."""
    inputs = {"user_features": user_sample, "item_features": item_sample}
    _export(ranker, path, inputs, "scores")


def _export(model: nn.Module, path: Path, inputs: dict[str, NDArray[Any]], output: str) -> None:
    model.eval()
    args = tuple(torch.from_numpy(a) for a in inputs.values())
    with _quiet_exporter():
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=list(inputs),
            output_names=[output],
            dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    _name_batch_axis(path)
    verify_onnx(model, path, inputs)
    verify_onnx(model, path, {name: a[:1] for name, a in inputs.items()})


def verify_onnx(model: nn.Module, path: Path, inputs: dict[str, NDArray[Any]]) -> float:
    """Run ``path`` in onnxruntime and ``model`` in torch on ``inputs``; return the largest
    absolute difference, raising ``ArtifactError`` naming the file above :data:`TOLERANCE`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.asarray(session.run(None, inputs)[0])
    with torch.no_grad():
        want = model(*(torch.from_numpy(a) for a in inputs.values())).numpy()
    if got.shape != want.shape:
        raise ArtifactError(f"{path.name}: onnxruntime shape {got.shape} != torch {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if diff > TOLERANCE:
        raise ArtifactError(f"{path.name}: onnxruntime differs from torch by {diff:.2e}")
    return diff


def verify_item_embeddings(
    path: Path,
    features: NDArray[np.float32],
    categories: NDArray[np.int64],
    expected: NDArray[np.float32],
) -> float:
    """Run the item tower at ``path`` on items' ``features`` and ``categories`` and compare
    with their shipped embeddings ``expected [B, D]``; return the largest absolute
    difference, raising ``ArtifactError`` naming the file above :data:`TOLERANCE`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {"item_features": features, "item_category": categories.astype(np.int64)}
    got = np.asarray(session.run(None, inputs)[0])
    if got.shape != expected.shape:
        raise ArtifactError(f"{path.name}: shape {got.shape} != item embeddings {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if diff > TOLERANCE:
        raise ArtifactError(f"{path.name}: differs from the item embeddings by {diff:.2e}")
    return diff


def _name_batch_axis(path: Path) -> None:
    """Rename the exporter's symbol for the batch axis (e.g. ``s4``) to ``batch``."""
    model = onnx.load(str(path))
    graph = model.graph
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"
    onnx.save(model, str(path))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known noise: a FutureWarning from torch's own pytree use and
    warning-level log lines about torchvision ops it cannot register."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        onnx_logger.setLevel(level)
