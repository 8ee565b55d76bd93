"""Generate Python stubs (with type stubs) from `protos/` into `gen/`, or check they are current.

`gen/` is generated and committed; nobody edits it. ``recmesh protos`` rewrites it;
``recmesh protos --check`` regenerates into a temporary directory and fails when the
committed tree differs, which is how CI catches stale stubs.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from mesh.paths import PROJECT_ROOT

PROTO_ROOT = PROJECT_ROOT / "protos"
GEN_ROOT = PROJECT_ROOT / "gen"


def _proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into ``out``.

    Every directory that receives modules also gets an empty ``__init__.py`` so the
    generated tree is a set of regular packages.

    Raises:
        RuntimeError: protoc reported an error.
    """
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p) for p in _proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    for module in list(out.rglob("*.py")):
        package = module.parent
        while package != out:
            (package / "__init__.py").touch()
            package = package.parent
    (out / "py.typed").touch()


def _differences(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ between two trees (missing on either side or changed)."""
    diffs: list[str] = []
    comparison = filecmp.dircmp(expected, actual)

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        diffs.extend(f"{prefix}{name}" for name in cmp.left_only + cmp.right_only)
        for name in cmp.common_files:
            if not filecmp.cmp(Path(cmp.left) / name, Path(cmp.right) / name, shallow=False):
                diffs.append(f"{prefix}{name}")
        for name, sub in cmp.subdirs.items():
            if name != "__pycache__":
                walk(sub, f"{prefix}{name}/")

    walk(comparison, "")
    return [d for d in diffs if "__pycache__" not in d]


def main(check: bool = False) -> int:
    """Regenerate `gen/`, or with ``check`` report stale files and return 1 when any."""
    if not check:
        if GEN_ROOT.exists():
            shutil.rmtree(GEN_ROOT)
        generate(GEN_ROOT)
        print(f"generated stubs for {len(_proto_files())} protos into {GEN_ROOT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        stale = _differences(fresh, GEN_ROOT) if GEN_ROOT.exists() else ["gen/ (missing)"]
    if stale:
        print("generated stubs are stale; run `make protos` and commit gen/:", file=sys.stderr)
        for path in stale:
            print(f"  {path}", file=sys.stderr)
        return 1
    print("generated stubs are current")
    return 0
