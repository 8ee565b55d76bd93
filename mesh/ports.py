"""Default ports of every process, the one table the settings and tooling read."""

from __future__ import annotations

import random
import socket
from pathlib import Path

DEFAULT_PORTS: dict[str, int] = {
    "gateway": 50050,
    "feature": 50051,
    "retrieval": 50052,
    "ranking": 50053,
    "experiment": 50054,
    "events": 50055,
    "quota": 50056,
    "projector": 50057,
}

GATEWAY_HTTP_PORT = 8080

SERVICES: tuple[str, ...] = (
    "feature",
    "retrieval",
    "ranking",
    "experiment",
    "events",
    "quota",
    "projector",
)
"""Internal services, in start order (the gateway starts last)."""

DEFAULT_METRICS_PORTS: dict[str, int] = {
    "feature": 9101,
    "retrieval": 9102,
    "ranking": 9103,
    "experiment": 9104,
    "events": 9105,
    "quota": 9106,
    "projector": 9107,
}
"""Prometheus ``/metrics`` port of every service (``RECMESH_<SERVICE>_METRICS_PORT``); the
gateway serves ``/metrics`` on its HTTP API port instead."""


def free_port(rng: random.Random | None = None) -> int:
    """A TCP port free on 127.0.0.1 now, for a process started next to bind (tests, local
    meshes of the tools).

    It is drawn below the kernel's ephemeral range (``ip_local_port_range``), never from
    it: a port the kernel hands out for outgoing connections (a Redis client, a gRPC
    channel) could otherwise be taken before the process that was given it binds it.

    Raises:
        OSError: no port below the ephemeral range is free.
    """
    draw = rng or random.SystemRandom()
    low = _ephemeral_low()
    candidates = list(range(10_000, low))
    draw.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port in 10000..{low - 1}")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
