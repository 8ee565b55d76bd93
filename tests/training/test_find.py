"""Finding a usable artifact set before training one (training/find.py), and the load-test
harness refusing to measure another set than the one it was given."""

from __future__ import annotations

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


def test_the_harness_refuses_an_explicit_root_without_a_usable_set(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no usable artifact set"):
        prepare_artifacts(tmp_path / "typo", tmp_path, items=100, users=50)
    assert not (tmp_path / "artifacts").exists()  # nothing was trained instead


def test_the_harness_measures_the_explicit_root_it_was_given(artifacts_root: Path) -> None:
    assert prepare_artifacts(artifacts_root, artifacts_root, items=100, users=50) == artifacts_root
