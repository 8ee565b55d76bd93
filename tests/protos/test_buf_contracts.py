"""The contracts' guard (buf.yaml, docs/contracts.md) holds on the tree and catches what it must.

The real tree passes ``buf lint`` and ``buf breaking`` against the committed baseline (what
``make contracts`` runs). Scratch copies of ``buf.yaml`` and ``protos/`` under ``tmp_path``,
edited one way each, show the check's teeth: a renumbered field (ours or Envoy's) and a message
moved to another file of its package fail it; a field added in place passes. Each ``buf`` run
takes well under a second.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"
GATEWAY = "recmesh/gateway/v1/gateway.proto"
RLS = "envoy/service/ratelimit/v3/rls.proto"


def baseline() -> str:
    """The baseline image ``make contracts`` checks against (the Makefile's CONTRACTS_BASELINE)."""
    found = re.search(r"^CONTRACTS_BASELINE\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile names no CONTRACTS_BASELINE"
    return found.group(1)


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: install the dev extra (buf-bin), e.g. `make test`")
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A copy of the module (buf.yaml, protos/ with the baseline) to edit."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def edit(root: Path, proto: str, old: str, new: str) -> None:
    path = root / "protos" / proto
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {proto}"
    path.write_text(text.replace(old, new))


def test_the_baseline_is_committed() -> None:
    assert (ROOT / baseline()).is_file()


def test_the_tree_passes_lint() -> None:
    result = buf("lint", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tree_has_no_breaking_change_against_the_baseline() -> None:
    result = buf("breaking", "--against", baseline(), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("proto", "old", "new", "named"),
    [
        pytest.param(
            GATEWAY, "int32 num_items = 2;", "int32 num_items = 12;", "num_items", id="renumbered"
        ),
        pytest.param(
            RLS,
            "uint32 limit_remaining = 3;",
            "uint32 limit_remaining = 9;",
            "limit_remaining",
            id="envoy-renumbered",
        ),
        pytest.param(GATEWAY, "string variant = 2;", "", "variant", id="field-removed"),
    ],
)
def test_a_breaking_edit_fails(scratch: Path, proto: str, old: str, new: str, named: str) -> None:
    edit(scratch, proto, old, new)
    result = buf("breaking", "--against", baseline(), cwd=scratch)
    assert result.returncode != 0
    assert named in result.stdout


def test_moving_a_message_to_another_file_fails(scratch: Path) -> None:
    """FILE, not PACKAGE: Python callers import the message from gateway_pb2."""
    block = "message ExperimentVariant {\n  string key = 1;\n  string variant = 2;\n}\n"
    edit(scratch, GATEWAY, block, "")
    edit(
        scratch,
        GATEWAY,
        'import "recmesh/common/v1/common.proto";',
        'import "recmesh/common/v1/common.proto";\nimport "recmesh/gateway/v1/variant.proto";',
    )
    moved = scratch / "protos" / "recmesh/gateway/v1/variant.proto"
    moved.write_text(f'syntax = "proto3";\n\npackage recmesh.gateway.v1;\n\n{block}')
    result = buf("breaking", "--against", baseline(), cwd=scratch)
    assert result.returncode != 0
    assert "ExperimentVariant" in result.stdout


def test_an_additive_change_passes(scratch: Path) -> None:
    """The version policy: a new field in place is not a breaking change."""
    edit(scratch, GATEWAY, "  bool debug = 4;\n", "  bool debug = 4;\n  string locale = 7;\n")
    result = buf("breaking", "--against", baseline(), cwd=scratch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert buf("lint", cwd=scratch).returncode == 0
