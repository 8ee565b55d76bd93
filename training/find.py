"""Find a usable artifact set, or train one: what every tool that starts a mesh needs first.

Importing this module is cheap and torch-free: the training stack is imported only when
a set has to be trained, so ``recmesh status`` and friends stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from mesh.errors import ArtifactError


def usable_set(root: Path) -> ArtifactSet | None:
    """The set ``root/current`` points at, when it loads: a well-formed manifest listing
    every required file, each present (hashes are not checked). None otherwise."""
    return _current_set(root)[0]


def _current_set(root: Path) -> tuple[ArtifactSet | None, str]:
    """:func:`usable_set` and, when it is None, why (a set built before a file joined the
    contract, such as ``item_tower.onnx``, says which file it lacks)."""
    try:
        return load_artifact_set(resolve_current(root), verify=False), ""
    except (ArtifactError, OSError) as exc:
        return None, str(exc)


def find_or_train(found: Path | None, train_root: Path, **config: Any) -> ArtifactSet:
    """The usable set under ``found``, else a new set trained under ``train_root``.

    Args:
        found: an artifact root to reuse when :func:`usable_set` accepts it; None always
            trains.
        train_root: the root a new set is trained under (``current`` then points at it);
            it may be ``found`` itself.
        config: fields of :class:`training.pipeline.TrainConfig` for a new set (none: the
            tuned defaults of ``python -m training train``).

    Returns:
        The set found or trained (loaded without hashing); its root is ``.path.parent``.

    Raises:
        TypeError: ``config`` names a field ``TrainConfig`` does not have (checked only
            when training).
    """
    if found is not None:
        existing, why = _current_set(found)
        if existing is not None:
            return existing
        print(f"no usable artifact set under {found} ({why})", flush=True)
    from training.pipeline import TrainConfig, train

    settings = TrainConfig(**config)
    print(
        f"training an artifact set under {train_root} "
        f"({settings.n_users} users, {settings.n_items} items) ...",
        flush=True,
    )
    return load_artifact_set(train(train_root, settings), verify=False)
