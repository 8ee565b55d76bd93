"""Artifact sets: write, load, verify, the current pointer and rollback (no torch needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from core.artifacts import (
    CURRENT,
    MANIFEST,
    REQUIRED_FILES,
    list_versions,
    load_artifact_set,
    resolve_current,
    rollback,
    set_current,
    write_artifact_set,
)
from mesh.errors import ArtifactError
from training.__main__ import main


def _make_files(directory: Path, tag: str) -> dict[str, Path]:
    """One small real file per required name; ``.npy`` ones hold arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, file_name in REQUIRED_FILES.items():
        path = directory / file_name
        if file_name.endswith(".npy"):
            np.save(path, np.arange(12, dtype=np.float32).reshape(3, 4))
        else:
            path.write_bytes(f"{name}-{tag}".encode())
        files[name] = path
    return files


def _write(root: Path, tmp: Path, tag: str) -> Path:
    return write_artifact_set(
        root,
        _make_files(tmp / f"src-{tag}", tag),
        seeds={"data": 1, "train": 2},
        config={"n_items": 3, "ranker_heads": ["click", "conversion"]},
        metrics={"retrieval.recall@100": 0.5},
        libraries={"numpy": np.__version__},
    )


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    path = _write(root, tmp_path, "a")
    assert path.parent == root and path.name == list_versions(root)[0]
    loaded = load_artifact_set(path)
    manifest = json.loads((path / MANIFEST).read_text())
    assert loaded.manifest == manifest
    assert loaded.version == manifest["version"] == path.name
    assert manifest["seeds"] == {"data": 1, "train": 2}
    assert set(manifest["files"]) == set(REQUIRED_FILES)
    for name, entry in manifest["files"].items():
        assert entry["path"] == REQUIRED_FILES[name]
        assert len(entry["sha256"]) == 64
    assert loaded.metrics == {"retrieval.recall@100": 0.5}
    assert loaded.config["ranker_heads"] == ["click", "conversion"]
    array = loaded.open_array("item_embeddings")
    assert isinstance(array, np.memmap)
    np.testing.assert_array_equal(array, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert loaded.file("ranker").read_bytes() == b"ranker-a"
    assert loaded.paths == {n: path / f for n, f in REQUIRED_FILES.items()}
    # Nothing partial is left behind, and source files were moved.
    assert [p.name for p in root.iterdir()] == [path.name]
    assert not (tmp_path / "src-a" / "ranker.onnx").exists()


def test_tampered_file_raises_naming_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "artifacts", tmp_path, "a")
    (path / "ranker.onnx").write_bytes(b"ranker-b")
    with pytest.raises(ArtifactError, match=r"ranker\.onnx"):
        load_artifact_set(path)
    assert load_artifact_set(path, verify=False).version == path.name


def test_missing_file_raises_naming_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "artifacts", tmp_path, "a")
    (path / "heldout.npz").unlink()
    with pytest.raises(ArtifactError, match=r"heldout\.npz"):
        load_artifact_set(path, verify=False)


def test_manifest_problems_raise(tmp_path: Path) -> None:
    path = _write(tmp_path / "artifacts", tmp_path, "a")
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["files"]["ann_index"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="ann_index"):
        load_artifact_set(path)
    manifest["files"]["ann_index"] = {"path": "../escape.faiss", "sha256": "0" * 64}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="escape"):
        load_artifact_set(path)
    (path / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=MANIFEST):
        load_artifact_set(path)


def test_incomplete_set_is_refused(tmp_path: Path) -> None:
    files = _make_files(tmp_path / "src", "a")
    del files["prerank"]
    with pytest.raises(ArtifactError, match="prerank"):
        write_artifact_set(
            tmp_path / "artifacts",
            files,
            seeds={"data": 0, "train": 0},
            config={},
            metrics={},
            libraries={},
        )
    assert list_versions(tmp_path / "artifacts") == []


def test_current_pointer_swap_and_rollback(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    with pytest.raises(ArtifactError, match=CURRENT):
        resolve_current(root)
    first = _write(root, tmp_path, "a")
    second = _write(root, tmp_path, "b")
    third = _write(root, tmp_path, "c")
    assert list_versions(root) == [first.name, second.name, third.name]

    assert set_current(root, third.name) == third
    link = root / CURRENT
    assert link.is_symlink() and os.readlink(link) == third.name  # relative target
    assert resolve_current(root) == third.resolve()
    assert load_artifact_set(link).version == third.name

    assert rollback(root) == second
    assert resolve_current(root).name == second.name
    assert rollback(root) == first
    with pytest.raises(ArtifactError, match="no version older"):
        rollback(root)
    assert rollback(root, third.name) == third
    assert resolve_current(root).name == third.name
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp links left

    with pytest.raises(ArtifactError):
        set_current(root, "no-such-version")
    assert resolve_current(root).name == third.name


def test_rollback_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "artifacts"
    first = _write(root, tmp_path, "a")
    second = _write(root, tmp_path, "b")
    set_current(root, second.name)
    assert main(["rollback", "--root", str(root)]) == 0
    assert resolve_current(root).name == first.name
    assert f"{second.name} -> {first.name}" in capsys.readouterr().out
    assert main(["rollback", "--root", str(root), "--to", second.name]) == 0
    assert resolve_current(root).name == second.name
    assert main(["rollback", "--root", str(root), "--to", "bogus"]) == 1
    assert "bogus" in capsys.readouterr().err
