"""The watcher on its own, with stand-in model sets: outcomes, retries, where old sets die."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from core.artifacts import CURRENT
from mesh.errors import ArtifactError, ConfigError
from services.runtime.artifact_watch import ArtifactWatcher


class Fake:
    """A loaded set: remembers which thread loaded it and which thread freed it."""

    freed_on: dict[str, int] = {}  # noqa: RUF012 (a test's shared record)

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.version = path.name
        self.loaded_on = threading.get_ident()

    def __del__(self) -> None:
        Fake.freed_on[self.version] = threading.get_ident()


def point(root: Path, version: str) -> None:
    (root / version).mkdir(exist_ok=True)
    link = root / CURRENT
    link.unlink(missing_ok=True)
    link.symlink_to(version)


def make(root: Path, load: object) -> tuple[ArtifactWatcher[Fake], list[Fake]]:
    point(root, "v1")
    installed: list[Fake] = []
    watcher = ArtifactWatcher(
        service="test",
        root=root,
        served=Fake(root / "v1"),
        load=load,  # type: ignore[arg-type]
        install=installed.append,
        poll_s=0,
        retire_after_s=0,
    )
    return watcher, installed


async def test_outcomes_and_where_sets_are_loaded_and_freed(tmp_path: Path) -> None:
    watcher, installed = make(tmp_path, lambda path, served: Fake(path))
    assert await watcher.check_once() == "unchanged"
    point(tmp_path, "v2")
    assert await watcher.check_once() == "swapped"
    assert [s.version for s in installed] == ["v2"]
    assert installed[0].loaded_on != threading.get_ident()
    await asyncio.sleep(0.05)  # the retire task runs
    assert Fake.freed_on["v1"] != threading.get_ident()
    assert watcher.status()["serving"] == "v2"
    await watcher.stop()


async def test_refused_target_is_retried_only_after_the_interval(tmp_path: Path) -> None:
    calls: list[str] = []

    def load(path: Path, served: Fake) -> Fake:
        calls.append(path.name)
        if path.name == "bad":
            raise ArtifactError(f"{path}/ranker.onnx: broken")
        return Fake(path)

    watcher, installed = make(tmp_path, load)
    point(tmp_path, "bad")
    assert await watcher.check_once() == "refused"
    assert await watcher.check_once() == "skipped"
    assert watcher.refused is not None and watcher.refused.version == "bad"
    assert watcher.refused.error.endswith("ranker.onnx: broken")
    watcher.retry_refused_s = 0
    assert await watcher.check_once() == "refused"
    assert calls == ["bad", "bad"]
    assert watcher.served.version == "v1" and installed == []
    point(tmp_path, "v3")
    assert await watcher.check_once() == "swapped"
    assert watcher.status()["refused"]["version"] == "bad"  # the last refusal stays on record
    assert watcher.refusals == 2 and watcher.swaps == 1
    await watcher.stop()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("onnxruntime exploded"), "RuntimeError: onnxruntime exploded"),
        (
            ConfigError("head weight 'x' names no ranker head"),
            "head weight 'x' names no ranker head",
        ),
    ],
)
async def test_every_refusal_names_the_set(tmp_path: Path, error: Exception, expected: str) -> None:
    def load(path: Path, served: Fake) -> Fake:
        raise error

    watcher, _ = make(tmp_path, load)
    point(tmp_path, "v2")
    assert await watcher.check_once() == "refused"
    assert watcher.refused is not None
    assert watcher.refused.error == f"{(tmp_path / 'v2').resolve()}: {expected}"


async def test_a_missing_current_is_refused_not_fatal(tmp_path: Path) -> None:
    def load(path: Path, served: Fake) -> Fake:
        if not (path / "manifest.json").is_file():
            raise ArtifactError(f"{path}/manifest.json: missing")
        return Fake(path)

    watcher, _ = make(tmp_path, load)
    (tmp_path / CURRENT).unlink()
    assert await watcher.check_once() == "refused"
    assert watcher.served.version == "v1"
    assert watcher.refused is not None and watcher.refused.version == CURRENT


async def test_polling_runs_in_the_background(tmp_path: Path) -> None:
    watcher, installed = make(tmp_path, lambda path, served: Fake(path))
    watcher.poll_s = 0.01
    await watcher.start()
    point(tmp_path, "v2")
    for _ in range(200):
        if installed:
            break
        await asyncio.sleep(0.01)
    await watcher.stop()
    assert [s.version for s in installed] == ["v2"]
