"""Finding the processes of a mesh by their pid files (:mod:`ops.processes`), on real
child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops import processes

SLEEPER = "import time; time.sleep(60)"


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A Python child that sleeps; its command line carries ``-m services.feature`` (as an
    argument of the script), the marker of the mesh's feature service."""
    process = subprocess.Popen([sys.executable, "-c", SLEEPER, "-m", "services.feature"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_live_process_is_found_by_name(tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
    processes.record(tmp_path / "run", "feature", child.pid)
    assert processes.running_pid(tmp_path / "run", "feature") == child.pid
    assert processes.running_pid(tmp_path / "run", "ranking") is None, "no pid file"
    assert processes.live_pid(processes.pid_file(tmp_path / "run", "feature"), "valkey") is None


def test_a_zombie_or_reaped_process_is_not_running(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    run_dir = tmp_path / "run"
    processes.record(run_dir, "feature", child.pid)
    child.send_signal(signal.SIGKILL)
    assert processes.wait_exit(run_dir, "feature", timeout_s=10), "a zombie counts as gone"
    assert processes.running_pid(run_dir, "feature") is None
    child.wait()
    assert processes.running_pid(run_dir, "feature") is None


def test_send_and_stop(tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
    run_dir = tmp_path / "run"
    processes.record(run_dir, "feature", child.pid)
    assert processes.send(run_dir, "feature", signal.SIGSTOP) == child.pid
    processes.send(run_dir, "feature", signal.SIGCONT)
    assert processes.stop(run_dir, "feature", grace_s=10)
    assert child.wait(timeout=10) == -signal.SIGTERM
    assert not processes.pid_file(run_dir, "feature").exists()
    assert not processes.stop(run_dir, "feature", grace_s=1), "nothing left to stop"
    with pytest.raises(RuntimeError, match="feature is not running"):
        processes.send(run_dir, "feature", signal.SIGTERM)
