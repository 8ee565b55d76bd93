"""The processes of a chaos run: the mesh's, broken on purpose, and the suite's own helpers.

:class:`Control` acts on the mesh through :mod:`ops.processes` (pid files, signals),
:func:`ops.supervisor.restart` and :func:`mesh.faults.write_flags`; what is its own is
remembering the processes it stopped so that a run never leaves one frozen.
:func:`load_generator`, :func:`ingest` and :func:`canary` run the suite's helper processes.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mesh.faults import write_flags
from mesh.paths import PROJECT_ROOT
from ops import processes, supervisor

TENANT = "demo"
"""The one tenant of a chaos run's registry."""


class Control:
    """Signals, restarts and fault flags for the processes of one mesh."""

    def __init__(self, layout: supervisor.Layout) -> None:
        self.layout = layout
        self.stopped: set[str] = set()

    def signal(self, name: str, signum: signal.Signals) -> None:
        """Send ``signum`` to ``name``; a SIGSTOP is remembered until its SIGCONT.

        Raises:
            RuntimeError: ``name`` is not running.
        """
        processes.send(self.layout.run_dir, name, signum)
        if signum == signal.SIGSTOP:
            self.stopped.add(name)
        elif signum == signal.SIGCONT:
            self.stopped.discard(name)

    def wait_exit(self, name: str, timeout_s: float) -> float:
        """Wait until ``name`` exited; returns when it did (wall clock).

        Raises:
            RuntimeError: still running after ``timeout_s``.
        """
        if not processes.wait_exit(self.layout.run_dir, name, timeout_s):
            raise RuntimeError(f"{name} still running {timeout_s:g} s after the signal")
        return time.time()

    def restart(self, name: str) -> None:
        """Start ``name`` again after it exited and wait until it is SERVING."""
        supervisor.restart(self.layout, name)

    def set_flags(self, flags: Mapping[str, Any]) -> None:
        """Replace the fault flags every server of the mesh watches (``{}``: none)."""
        write_flags(self.layout.faults_file, flags)

    def resume_all(self) -> None:
        """SIGCONT whatever this run stopped (clean-up)."""
        for name in list(self.stopped):
            with contextlib.suppress(RuntimeError, OSError):
                self.signal(name, signal.SIGCONT)


@contextlib.contextmanager
def load_generator(
    url: str, api_key: str, base: Path, *, rate: float, click_share: float, n_users: int, seed: int
) -> Iterator[int]:
    """Run :mod:`chaos.load` in its own process (writing ``base/requests.jsonl``) against
    ``url`` as tenant :data:`TENANT`; yields its pid. The keywords are its options
    (``python -m chaos.load --help``)."""
    out, stop = base / "requests.jsonl", base / "load.stop"
    command = [
        sys.executable,
        "-m",
        "chaos.load",
        f"--url={url}",
        f"--api-key={api_key}",
        f"--tenant={TENANT}",
        f"--rate={rate}",
        f"--click-share={click_share}",
        f"--n-users={n_users}",
        f"--stop-file={stop}",
        f"--out={out}",
        f"--seed={seed}",
        "--duration=3600",
    ]
    with open(base / "load.log", "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield process.pid
    finally:
        _stop_by_file(process, stop, timeout_s=20)


@contextlib.contextmanager
def ingest(
    url: str,
    api_key: str,
    base: Path,
    *,
    rate: float,
    batch: int,
    click_share: float,
    n_users: int,
    n_items: int,
    seed: int,
) -> Iterator[int]:
    """Run :mod:`chaos.ingest` in its own process (writing ``base/ingest.jsonl``) against
    ``url``; yields its pid. The keywords are its options (``python -m chaos.ingest --help``)."""
    stop = base / "ingest.stop"
    command = [
        sys.executable,
        "-m",
        "chaos.ingest",
        f"--url={url}",
        f"--api-key={api_key}",
        f"--rate={rate}",
        f"--batch={batch}",
        f"--click-share={click_share}",
        f"--n-users={n_users}",
        f"--n-items={n_items}",
        f"--stop-file={stop}",
        f"--out={base / 'ingest.jsonl'}",
        f"--seed={seed}",
    ]
    with open(base / "ingest.log", "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield process.pid
    finally:
        _stop_by_file(process, stop, timeout_s=10)


@contextlib.contextmanager
def canary(base: Path) -> Iterator[int]:
    """Run :mod:`chaos.canary` (writing ``base/canary.jsonl``); yields its pid."""
    stop = base / "canary.stop"
    command = [
        sys.executable,
        "-m",
        "chaos.canary",
        f"--out={base / 'canary.jsonl'}",
        f"--stop-file={stop}",
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        yield process.pid
    finally:
        _stop_by_file(process, stop, timeout_s=10)


def _stop_by_file(process: subprocess.Popen[bytes], stop: Path, timeout_s: float) -> None:
    """Ask ``process`` to finish by creating its ``stop`` file; SIGKILL it after ``timeout_s``."""
    stop.touch()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
