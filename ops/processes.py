"""The processes of one local mesh, by name: find, signal, wait for, stop.

:mod:`ops.supervisor` records the pid of every process it starts (the embedded Redis, the
services, the gateway) in ``<run_dir>/<name>.pid``. A recorded pid still names that process
only while ``/proc`` shows it alive (not a zombie) and its command line carries the
process's marker (:func:`marker`): a pid file left behind by a process that died, or a pid
the kernel has since given to another program, finds nothing. ``recmesh up|down|status``
(through the supervisor), the load-test harness and the chaos suite all go through here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from mesh.ports import SERVICES

MODULES: dict[str, str] = {name: f"services.{name}" for name in SERVICES} | {"gateway": "gateway"}
"""The module each Python process of the mesh runs (``python -m <module>``)."""

REDIS = "redis"
"""The name of the embedded Redis (``valkey-server``) among the mesh's processes."""


def marker(name: str) -> str:
    """What the command line of mesh process ``name`` contains."""
    return "valkey-server" if name == REDIS else f"-m {MODULES[name]}"


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def record(run_dir: Path, name: str, pid: int) -> None:
    """Remember ``pid`` as mesh process ``name``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    pid_file(run_dir, name).write_text(str(pid))


def live_pid(path: Path, marker: str) -> int | None:
    """The pid recorded in ``path`` if that process is alive, not a zombie, and its command
    line contains ``marker``; None otherwise (no file, no such process, another program)."""
    try:
        pid = int(path.read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return pid if marker in cmdline and state not in ("Z", "X") else None


def running_pid(run_dir: Path, name: str) -> int | None:
    """The live pid of mesh process ``name`` (see :func:`live_pid`)."""
    return live_pid(pid_file(run_dir, name), marker(name))


def send(run_dir: Path, name: str, signum: signal.Signals) -> int:
    """Send ``signum`` to mesh process ``name``; returns its pid.

    Raises:
        RuntimeError: ``name`` is not running.
    """
    pid = running_pid(run_dir, name)
    if pid is None:
        raise RuntimeError(f"{name} is not running")
    os.kill(pid, signum)
    return pid


def wait_exit(run_dir: Path, name: str, timeout_s: float) -> bool:
    """Wait until mesh process ``name`` is gone (exited, or a zombie); False when it is
    still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while running_pid(run_dir, name) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop(run_dir: Path, name: str, grace_s: float) -> bool:
    """SIGTERM mesh process ``name``, SIGKILL it when it is still running after ``grace_s``;
    forget its pid. Returns whether it was running."""
    pid = running_pid(run_dir, name)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        if not wait_exit(run_dir, name, grace_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    pid_file(run_dir, name).unlink(missing_ok=True)
    return pid is not None
