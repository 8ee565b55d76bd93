"""Loading models from the live artifact set, shared by retrieval and ranking.

Both services load a set the same way, at start-up and on every hot swap
(:mod:`services.runtime.artifact_watch`): ``load_artifact_set`` (manifest + sha256 of every file),
then the model files they serve, then :func:`check_set_contract` (every ONNX model of the
set takes and returns the widths the set's config declares), then their own
``check_replaces`` against the set being served. Every refusal is an ``ArtifactError``
naming the file at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort

from core.artifacts import ArtifactSet
from mesh.errors import ArtifactError
from mesh.health import HealthCheck


def onnx_session(path: str) -> ort.InferenceSession:
    """An ONNX Runtime CPU session sized for a latency-bound server.

    One intra-op thread and no spinning: requests run concurrently on the event loop,
    so a pool of spinning threads would only steal CPU from the other requests.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


@contextmanager
def loading(path: Path) -> Iterator[None]:
    """Turn any failure while reading ``path`` into an ``ArtifactError`` that names it."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as exc:  # ONNX Runtime, FAISS and numpy each raise their own types
        raise ArtifactError(f"{path}: cannot load: {type(exc).__name__}: {exc}") from exc


def open_onnx(path: Path) -> ort.InferenceSession:
    """:func:`onnx_session` for an artifact file, failures naming the file."""
    with loading(path):
        return onnx_session(str(path))


ONNX_CONTRACT: dict[str, dict[str, str | None]] = {
    "user_tower": {"in:user_features": "user_feature_dim", "out:user_embedding": "embedding_dim"},
    "item_tower": {
        "in:item_features": "item_feature_dim",
        "in:item_category": None,
        "out:item_embedding": "embedding_dim",
    },
    "ranker": {
        "in:user_features": "user_feature_dim",
        "in:item_features": "item_feature_dim",
        "out:scores": "ranker_heads",
    },
}
"""Manifest file key -> ``in:``/``out:`` tensor name -> the config key giving its width
(``ranker_heads``: the number of heads), for tensors ``[batch, width]`` float32; None for
an int64 vector ``[batch]`` (the item tower's categories)."""


def onnx_tensors(
    session: ort.InferenceSession,
) -> dict[str, tuple[str, list[int | str | None]]]:
    """``in:<name>``/``out:<name>`` -> (element type, e.g. ``tensor(float)``, and shape;
    symbolic dimensions are strings or None)."""
    tensors: dict[str, tuple[str, list[int | str | None]]] = {}
    for kind, args in (("in", session.get_inputs()), ("out", session.get_outputs())):
        for arg in args:
            tensors[f"{kind}:{arg.name}"] = (str(arg.type), list(arg.shape or []))
    return tensors


def check_set_contract(
    artifacts: ArtifactSet, sessions: Mapping[str, ort.InferenceSession] | None = None
) -> None:
    """Every ONNX model of the set has the tensors, types and widths its config declares.

    Both services check the whole set, not only the models they serve, so a set with one
    bad model is refused by both rather than served by one. ``sessions`` are models already
    opened (by manifest key); the others are opened here and dropped.

    Raises:
        ArtifactError: a model lacks a tensor or has the wrong type, rank or width; names
            the file.
    """
    config = artifacts.config
    for key, contract in ONNX_CONTRACT.items():
        path = artifacts.file(key)
        session = (sessions or {}).get(key) or open_onnx(path)
        tensors = onnx_tensors(session)
        for tensor, config_key in contract.items():
            label = repr(tensor.replace(":", "put "))
            if tensor not in tensors:
                raise ArtifactError(f"{path}: no {label} tensor")
            element, shape = tensors[tensor]
            if config_key is None:
                if element != "tensor(int64)" or len(shape) != 1:
                    raise ArtifactError(
                        f"{path}: {label} is {element} of shape {shape}, expected an int64 "
                        "[batch] vector"
                    )
                continue
            if len(shape) != 2 or element != "tensor(float)":
                raise ArtifactError(
                    f"{path}: {label} is {element} of shape {shape}, expected float32 "
                    "[batch, width]"
                )
            value = config.get(config_key)
            expected = len(value) if isinstance(value, list) else value
            width = shape[1] if isinstance(shape[1], int) else None
            if width is None or width != expected:
                raise ArtifactError(
                    f"{path}: {label} is {width} wide, but the set's "
                    f"config says {config_key} = {expected}"
                )


def check_same_width(
    path: Path, what: str, candidate: int, served: int, served_version: str
) -> None:
    """Refuse a candidate whose feature width differs from the served set's.

    The feature store holds rows of the served width (materialised from an earlier set),
    so a model of another width would fail or degrade every request.

    Raises:
        ArtifactError: the widths differ.
    """
    if candidate != served:
        raise ArtifactError(
            f"{path}: takes {what} {candidate} wide, but the served set {served_version} "
            f"and the feature store use {served}; re-materialise features and restart "
            "to change feature widths"
        )


def artifacts_check(served_dir: Callable[[], Path]) -> HealthCheck:
    """Healthy while the artifact set being served is still on disk (manifest present).

    ``served_dir`` is asked on every probe, so the check follows hot swaps.
    """

    async def probe() -> None:
        version_dir = served_dir()
        if not (version_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{version_dir}/manifest.json is gone")

    return HealthCheck("artifacts", probe)
