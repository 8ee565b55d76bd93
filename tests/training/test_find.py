"""Finding a usable artifact set before training one (training/find.py), and the load-test
harness refusing to measure another set than the one it was given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.artifacts import MANIFEST, resolve_current
from loadtest.harness import prepare_artifacts
from mesh.errors import ArtifactError
from training.find import find_or_train, usable_set


def test_a_usable_set_is_found_and_nothing_is_trained(artifacts_root: Path, tmp_path: Path) -> None:
    found = find_or_train(artifacts_root, tmp_path / "never")
    assert found.path == resolve_current(artifacts_root)
    assert not (tmp_path / "never").exists()


def test_no_current_or_a_broken_one_is_not_usable(artifacts_root: Path, tmp_path: Path) -> None:
    assert usable_set(tmp_path) is None
    broken = tmp_path / "broken"
    shutil.copytree(artifacts_root, broken, symlinks=True)
    (resolve_current(broken) / MANIFEST).write_text("{")
    assert usable_set(broken) is None


def test_a_set_from_before_the_item_tower_is_retrained(
    artifacts_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A current set that lacks a file of today's contract (``item_tower.onnx`` came with
    issue 16) is not reused: ``make up`` trains a new one and says why."""
    old = tmp_path / "old"
    shutil.copytree(artifacts_root, old, symlinks=True)
    version = resolve_current(old)
    (version / "item_tower.onnx").unlink()
    manifest = json.loads((version / MANIFEST).read_text())
    del manifest["files"]["item_tower"]
    (version / MANIFEST).write_text(json.dumps(manifest))
    assert usable_set(old) is None
    trained: list[Path] = []

    def fake_train(root: Path, config: object) -> Path:
        trained.append(root)
        return resolve_current(artifacts_root)

    monkeypatch.setattr("training.pipeline.train", fake_train)
    find_or_train(old, old)
    assert trained == [old]
    assert "lacks required files: item_tower" in capsys.readouterr().out


def test_the_harness_refuses_an_explicit_root_without_a_usable_set(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no usable artifact set"):
        prepare_artifacts(tmp_path / "typo", tmp_path, items=100, users=50)
    assert not (tmp_path / "artifacts").exists()  # nothing was trained instead


def test_the_harness_measures_the_explicit_root_it_was_given(artifacts_root: Path) -> None:
    assert prepare_artifacts(artifacts_root, artifacts_root, items=100, users=50) == artifacts_root
