"""Fault injection by named flags, for chaos experiments.

Every server reads the same flags file (``RECMESH_FAULTS_FILE``; ``make up`` uses
``var/faults.json``) and re-reads it when it changes, so flags are switched at runtime
by rewriting the file with :func:`write_flags` (``recmesh chaos`` does exactly that)::

    {"ranking": {"Rank": {"error_rate": 0.5, "code": "UNAVAILABLE"}},
     "retrieval": {"*": {"latency_ms": 200}},
     "feature": {"GetUserFeatures": {"hang": true}}}

Top-level keys are service names; inner keys are method names or ``*``. A fault adds
``latency_ms`` before the handler, ``hang`` waits until the caller's deadline cancels the
call, and ``error_rate`` fails that share of calls with ``code``. A missing or empty file
means no faults; a malformed one is logged and ignored (the previous flags stay).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from mesh.errors import RecMeshError

log = logging.getLogger(__name__)

HANG_S = 3600.0


class InjectedFault(RecMeshError):
    """An error produced on purpose by a fault flag."""

    def __init__(self, code: grpc.StatusCode, flag: str) -> None:
        super().__init__(f"fault injected by flag {flag}")
        self.grpc_code = code


@dataclass(frozen=True)
class Fault:
    """One flag's effect on a method."""

    error_rate: float = 0.0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    latency_ms: float = 0.0
    hang: bool = False

    @classmethod
    def parse(cls, raw: object, where: str) -> Fault:
        """A fault from its JSON object.

        Raises:
            ValueError: unknown keys or values out of range (message names ``where``).
        """
        if not isinstance(raw, dict) or not set(raw) <= {
            "error_rate",
            "code",
            "latency_ms",
            "hang",
        }:
            raise ValueError(f"{where}: expected an object with error_rate/code/latency_ms/hang")
        rate = float(raw.get("error_rate", 0.0))
        latency = float(raw.get("latency_ms", 0.0))
        if not 0.0 <= rate <= 1.0 or latency < 0:
            raise ValueError(f"{where}: error_rate must be in [0, 1] and latency_ms >= 0")
        try:
            code = grpc.StatusCode[str(raw.get("code", "UNAVAILABLE"))]
        except KeyError as exc:
            raise ValueError(f"{where}: unknown status code {raw.get('code')!r}") from exc
        return cls(rate, code, latency, bool(raw.get("hang", False)))


def _parse_section(section: object, where: str) -> dict[str, Fault]:
    """One service's faults (method -> fault) from its object in the flags file.

    Raises:
        ValueError: not an object, or a fault is invalid (message names ``where``).
    """
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected an object of methods")
    return {method: Fault.parse(raw, f"{where}.{method}") for method, raw in section.items()}


def write_flags(path: Path, flags: Mapping[str, Mapping[str, object]]) -> None:
    """Replace the flags file at ``path`` with ``flags`` (service -> method -> fault).

    The flags are checked with the parser every :class:`FaultInjector` uses, so a flag the
    servers would ignore fails here instead. The file is replaced atomically (a reader sees
    the old flags or the new ones, never a partial file); ``{}`` clears every fault.

    Raises:
        ValueError: a flag does not parse (the file is left untouched).
    """
    document = json.loads(json.dumps(flags))
    for service, section in document.items():
        _parse_section(section, f"{path}: {service}")
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(document))
    scratch.replace(path)


class FaultInjector:
    """The flags of one service, reloaded from ``path`` when the file changes.

    Args:
        service: this process's service name (the top-level key it reads).
        path: the flags file; None disables fault injection.
        seed: seed of the error-rate draws, so a chaos run is repeatable.
    """

    def __init__(self, service: str, path: Path | None, seed: int = 0) -> None:
        self._service = service
        self._path = path
        self._rng = random.Random(seed)
        self._stamp: float | None = None
        self.faults: dict[str, Fault] = {}

    def reload(self) -> None:
        """Re-read the file if its modification time changed."""
        if self._path is None:
            return
        try:
            stamp = self._path.stat().st_mtime
        except FileNotFoundError:
            if self.faults:
                log.info("fault flags cleared")
            self._stamp, self.faults = None, {}
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            document = json.loads(self._path.read_text() or "{}")
            section = document.get(self._service, {}) if isinstance(document, dict) else {}
            faults = _parse_section(section, f"{self._path}: {self._service}")
        except (OSError, ValueError) as exc:
            log.error("fault flags ignored: %s", exc)
            return
        if faults != self.faults:
            log.warning("fault flags active", extra={"fields": {"faults": sorted(faults)}})
        self.faults = faults

    async def watch(self, interval_s: float = 0.25) -> None:
        """Reload forever (run as a background task)."""
        while True:
            self.reload()
            await asyncio.sleep(interval_s)

    def active(self, method: str) -> tuple[str, Fault] | None:
        """The flag that applies to ``method`` (its short name), if any."""
        if method in self.faults:
            return method, self.faults[method]
        if "*" in self.faults:
            return "*", self.faults["*"]
        return None

    async def apply(self, method: str) -> str | None:
        """Inject the fault for ``method``; returns the flag's name when one applied.

        Raises:
            InjectedFault: the error-rate draw chose this call to fail.
        """
        found = self.active(method)
        if found is None:
            return None
        name, fault = found
        flag = f"{self._service}.{name}"
        if fault.hang:
            await asyncio.sleep(HANG_S)
        if fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000.0)
        if fault.error_rate and self._rng.random() < fault.error_rate:
            raise InjectedFault(fault.code, flag)
        return flag
