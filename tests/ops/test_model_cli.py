"""``recmesh versions``, ``recmesh rollback`` and ``recmesh eval`` on an artifact root."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.artifacts import MANIFEST, resolve_current, set_current
from ops.cli import main

OLD = "20000101T000000.000000Z-00000001"
NEW = "20000102T000000.000000Z-00000002"


@pytest.fixture
def root(artifacts_root: Path, tmp_path: Path) -> Path:
    """Two versions (copies of the session set), ``current`` -> the newer."""
    root = tmp_path / "artifacts"
    root.mkdir()
    source = resolve_current(artifacts_root)
    for version in (OLD, NEW):
        shutil.copytree(source, root / version)
        manifest = json.loads((root / version / MANIFEST).read_text())
        manifest["version"] = version
        (root / version / MANIFEST).write_text(json.dumps(manifest))
    set_current(root, NEW)
    return root


def test_rollback_moves_current_to_the_previous_version(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rollback", "--root", str(root)]) == 0
    assert resolve_current(root).name == OLD
    assert f"current: {NEW} -> {OLD}" in capsys.readouterr().out


def test_rollback_reads_the_root_from_the_environment(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECMESH_ARTIFACTS", str(root))
    set_current(root, OLD)
    assert main(["rollback", "--to", NEW]) == 0
    assert resolve_current(root).name == NEW
    assert f"current: {OLD} -> {NEW}" in capsys.readouterr().out


def test_rollback_without_an_older_version_fails_cleanly(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_current(root, OLD)
    assert main(["rollback", "--root", str(root)]) == 1
    assert resolve_current(root).name == OLD
    assert f"no version older than {OLD}" in capsys.readouterr().err
    assert main(["rollback", "--root", str(root), "--to", "nope"]) == 1
    assert "not a version directory" in capsys.readouterr().err


def test_versions_marks_current_and_broken_sets(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / OLD / "ann.faiss").unlink()
    assert main(["versions", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"* {NEW}  seeds 0/0") for line in lines)
    assert any(line.startswith(f"  {OLD}  BROKEN:") and "ann.faiss" in line for line in lines)
    with (root / NEW / "ranker.onnx").open("ab") as ranker:
        ranker.write(b"tampered")
    assert main(["versions", "--root", str(root)]) == 0
    assert f"* {NEW}  seeds" in capsys.readouterr().out
    assert main(["versions", "--root", str(root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"* {NEW}  BROKEN:" in out and "does not match its sha256" in out


def test_eval_passes_every_argument_to_the_training_command(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setenv("RECMESH_ARTIFACTS", str(root))
    monkeypatch.setattr(subprocess, "run", run)
    assert main(["eval", "--eval-users", "50", "--help"]) == 0
    assert calls[0][1:] == [
        "-m", "training", "eval", "--root", str(root), "--eval-users", "50", "--help",
    ]  # fmt: skip
