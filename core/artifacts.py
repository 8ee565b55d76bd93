"""Versioned artifact sets: write, verify, load, and the atomic ``current`` pointer.

This module does not import torch; services import it.

Layout under a root directory::

    <root>/<version>/manifest.json
    <root>/<version>/<files listed in the manifest>
    <root>/current -> <version>          (relative symlink)

A version is ``YYYYMMDDTHHMMSS.ffffffZ-<8 hex>``: the UTC creation time (so versions sort
by age) and the start of a sha256 over the set's file digests. A version directory
appears only complete: files are gathered in a hidden ``.partial-*`` directory that is
renamed into place after ``manifest.json`` is written. ``current`` is swapped by creating a
temporary symlink and ``os.replace``-ing it over the old one, so readers always see
either the old or the new version.

``manifest.json`` holds ``version``, ``created_at`` (ISO 8601 UTC), ``seeds`` (``data``,
``train``), ``config``, ``files`` (key -> ``{"path", "sha256"}``, paths relative to the
version directory), ``metrics``, ``libraries`` and ``timings_s``. Every key of
:data:`REQUIRED_FILES` must be listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mesh.errors import ArtifactError

MANIFEST = "manifest.json"
CURRENT = "current"

REQUIRED_FILES: dict[str, str] = {
    "user_tower": "user_tower.onnx",
    "item_tower": "item_tower.onnx",
    "item_embeddings": "item_embeddings.npy",
    "ann_index": "ann.faiss",
    "ranker": "ranker.onnx",
    "prerank": "prerank.npz",
    "user_features": "user_features.npy",
    "item_features": "item_features.npy",
    "item_categories": "item_categories.npy",
    "item_popularity": "item_popularity.npy",
    "user_history": "user_history.npz",
    "heldout": "heldout.npz",
}
"""Manifest file key -> file name inside a version directory. Services rely on both."""

_MANIFEST_KEYS = ("version", "created_at", "seeds", "config", "files", "metrics", "libraries")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ArtifactSet:
    """A loaded (and, unless asked otherwise, verified) artifact set.

    Attributes:
        path: the version directory (symlinks resolved).
        manifest: the parsed ``manifest.json``.
    """

    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest["config"])

    @property
    def metrics(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in self.manifest["metrics"].items()}

    @property
    def paths(self) -> dict[str, Path]:
        """Absolute path of every file in the manifest, by key."""
        return {name: self.path / str(e["path"]) for name, e in self.manifest["files"].items()}

    def file(self, name: str) -> Path:
        """Absolute path of manifest file ``name``; ``ArtifactError`` if it is not listed."""
        files = self.manifest["files"]
        if name not in files:
            raise ArtifactError(f"{self.path / MANIFEST}: no file named {name!r}")
        return self.path / str(files[name]["path"])

    def open_array(self, name: str, *, mmap: bool = True) -> NDArray[Any]:
        """Load ``.npy`` file ``name``, memory-mapped read-only by default."""
        path = self.file(name)
        try:
            array: NDArray[Any] = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: cannot read array: {exc}") from exc
        return array

    def open_npz(self, name: str) -> dict[str, NDArray[Any]]:
        """Load every array of ``.npz`` file ``name`` into memory."""
        path = self.file(name)
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {key: np.asarray(npz[key]) for key in npz.files}
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: cannot read arrays: {exc}") from exc


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (constant memory for large arrays)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact_set(
    root: Path,
    files: Mapping[str, Path],
    *,
    seeds: Mapping[str, int],
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
    libraries: Mapping[str, str],
    timings_s: Mapping[str, float] | None = None,
) -> Path:
    """Move ``files`` (manifest key -> existing file) into a new version under ``root``.

    Each file keeps its base name. ``files`` must cover :data:`REQUIRED_FILES`; ``seeds``
    must hold ``data`` and ``train``. The version directory appears atomically, complete
    with ``manifest.json``; ``current`` is not touched (see :func:`set_current`). Files
    are moved (a rename when on the same file system as ``root``), not copied.

    Returns the new version directory.
    """
    missing = sorted(set(REQUIRED_FILES) - set(files))
    if missing:
        raise ArtifactError(f"artifact set lacks required files: {', '.join(missing)}")
    if set(seeds) != {"data", "train"}:
        raise ValueError("seeds must have exactly the keys 'data' and 'train'")
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".partial-{uuid.uuid4().hex}"
    partial.mkdir()
    try:
        entries: dict[str, dict[str, str]] = {}
        for name, source in sorted(files.items()):
            target = partial / source.name
            if target.exists():
                raise ArtifactError(f"{source.name}: two files share this name")
            shutil.move(source, target)
            entries[name] = {"path": source.name, "sha256": sha256_file(target)}
        created = datetime.now(UTC)
        version = f"{created:%Y%m%dT%H%M%S.%f}Z-{_content_hash(entries)[:8]}"
        manifest = {
            "version": version,
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "seeds": {"data": int(seeds["data"]), "train": int(seeds["train"])},
            "config": dict(config),
            "files": entries,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "libraries": dict(libraries),
            "timings_s": dict(timings_s or {}),
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        final = root / version
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def load_artifact_set(path: Path, *, verify: bool = True) -> ArtifactSet:
    """Load the version directory ``path`` (``current`` symlinks are followed).

    Checks that the manifest is well-formed, lists every key of :data:`REQUIRED_FILES`, and
    that every listed file exists inside the directory; with ``verify`` also that each
    file's sha256 matches. Raises ``ArtifactError`` naming the offending file otherwise.
    """
    directory = path.resolve()
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{manifest_path}: missing") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{manifest_path}: unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or any(k not in manifest for k in _MANIFEST_KEYS):
        raise ArtifactError(f"{manifest_path}: needs keys {', '.join(_MANIFEST_KEYS)}")
    files = manifest["files"]
    missing = sorted(set(REQUIRED_FILES) - set(files))
    if missing:
        raise ArtifactError(f"{manifest_path}: lacks required files: {', '.join(missing)}")
    for name, entry in sorted(files.items()):
        if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
            raise ArtifactError(f"{manifest_path}: entry for file {name!r} needs path and sha256")
        file_path = (directory / str(entry["path"])).resolve()
        if file_path.parent != directory:
            raise ArtifactError(f"{entry['path']}: file {name!r} lies outside {directory}")
        if not file_path.is_file():
            raise ArtifactError(f"{file_path}: file {name!r} is missing")
        if verify and sha256_file(file_path) != entry["sha256"]:
            raise ArtifactError(f"{file_path}: file {name!r} does not match its sha256")
    return ArtifactSet(path=directory, manifest=manifest)


def list_versions(root: Path) -> list[str]:
    """Version directories under ``root`` (those with a manifest), oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and not p.is_symlink() and (p / MANIFEST).is_file()
    )


def set_current(root: Path, version: str) -> Path:
    """Point ``root/current`` at ``version`` atomically; returns the version directory.

    The target must be a version directory under ``root`` with a manifest (its files are
    not re-hashed here); ``ArtifactError`` otherwise.
    """
    target = root / version
    if version in (CURRENT, "") or "/" in version or not (target / MANIFEST).is_file():
        raise ArtifactError(f"{target}: not a version directory with a {MANIFEST}")
    temporary = root / f".{CURRENT}-{uuid.uuid4().hex}"
    os.symlink(version, temporary)
    try:
        os.replace(temporary, root / CURRENT)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def resolve_current(root: Path) -> Path:
    """The version directory ``root/current`` points at; ``ArtifactError`` if none."""
    link = root / CURRENT
    if not link.is_symlink():
        raise ArtifactError(f"{link}: no current artifact set")
    target = link.resolve()
    if not (target / MANIFEST).is_file():
        raise ArtifactError(f"{link}: points at {target}, which has no {MANIFEST}")
    return target


def rollback(root: Path, to: str | None = None) -> Path:
    """Move ``current`` to version ``to``, or by default to the version just older than the
    current one. Returns the new current directory; ``ArtifactError`` if there is none."""
    if to is None:
        versions = list_versions(root)
        live = resolve_current(root).name
        older = [v for v in versions if v < live]
        if not older:
            raise ArtifactError(f"{root / CURRENT}: no version older than {live}")
        to = older[-1]
    return set_current(root, to)


def _content_hash(entries: Mapping[str, Mapping[str, str]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(f"{name}={entries[name]['sha256']}\n".encode())
    return digest.hexdigest()
