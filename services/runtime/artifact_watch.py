"""Hot swap of the artifact set a service serves, under live traffic.

An :class:`ArtifactWatcher` polls ``<root>/current`` every ``RECMESH_ARTIFACT_POLL_S``
seconds (``ModelServingSettings.artifact_poll_s``). When it resolves to a version directory
other than the one being served, the watcher loads the candidate in a worker thread
(``asyncio.to_thread``): the service's loader verifies every file's sha256, opens the
models, checks their shapes against the set's config and against the served set, and
warms them up. Only a candidate that passed
all of that is installed, by one attribute assignment on the event loop; servicers read
their models once per request, so a request runs entirely on the old or entirely on the
new set, and none fails because of the swap.

A candidate that fails is *refused*: one error log line names the version and the file at
fault, the service keeps serving the previous set (health stays SERVING), and the refusal
is recorded in :attr:`ArtifactWatcher.refused`, in ``recmesh_artifact_swaps_total
{outcome="refused"}`` and in the ``recmesh_artifact_info`` metric (``serving`` and
``refused`` versions). The same refused target is retried at most every
``retry_refused_s`` (a transient failure such as running out of memory heals; a corrupt
set is logged again). Pointing ``current`` anywhere else retries at once.

The previous set is released in a worker thread once in-flight requests had time to
finish, so freeing a large index does not stall the loop either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from prometheus_client import Counter, Gauge, Info

from core.artifacts import CURRENT
from mesh.errors import RecMeshError

log = logging.getLogger(__name__)

SWAPS = Counter(
    "recmesh_artifact_swaps_total",
    "Candidate artifact sets a service swapped in or refused, by service and outcome",
    ["service", "outcome"],
)
LOAD_SECONDS = Gauge(
    "recmesh_artifact_load_seconds",
    "Seconds the last candidate artifact set took to load, verify and warm up",
    ["service"],
)
INFO = Info(
    "recmesh_artifact",
    "Artifact set a service serves, and the last one it refused (empty when none)",
    ["service"],
)

Outcome = Literal["unchanged", "swapped", "refused", "skipped"]


class Served(Protocol):
    """What the watcher needs of a loaded model set."""

    @property
    def path(self) -> Path:
        """The version directory (resolved)."""
        ...

    @property
    def version(self) -> str:
        """The manifest's version."""
        ...


M = TypeVar("M", bound=Served)


@dataclass(frozen=True)
class Refusal:
    """A candidate set that was refused: which, why, and when (``time.time()``)."""

    path: Path
    version: str
    error: str
    at: float


class ArtifactWatcher(Generic[M]):
    """Watches ``root/current`` and swaps the served model set when it moves.

    Args:
        service: name used in logs and metrics.
        root: the artifact root holding ``current``.
        served: the set loaded at start-up.
        load: ``load(path, served) -> candidate``, blocking (run in a worker thread): loads,
            verifies, checks against ``served`` and warms up the set at ``path``; raises
            (``ArtifactError`` naming the file, preferably) to refuse it.
        install: puts a candidate in service (e.g. ``servicer.models = candidate``); called on
            the event loop, must be one atomic assignment.
        poll_s: seconds between polls; 0 or less never polls (``check_once`` still works).
        retry_refused_s: least seconds before the same refused target is tried again.
        retire_after_s: seconds the previous set is kept (for in-flight requests) before it
            is released in a worker thread.
    """

    def __init__(
        self,
        *,
        service: str,
        root: Path,
        served: M,
        load: Callable[[Path, M], M],
        install: Callable[[M], None],
        poll_s: float = 2.0,
        retry_refused_s: float = 60.0,
        retire_after_s: float = 5.0,
    ) -> None:
        self.service = service
        self.root = root
        self._served = served
        self._load = load
        self._install = install
        self.poll_s = poll_s
        self.retry_refused_s = retry_refused_s
        self.retire_after_s = retire_after_s
        self.refused: Refusal | None = None
        self.swaps = 0
        self.refusals = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._publish()

    @property
    def served(self) -> M:
        """The model set in service now."""
        return self._served

    def status(self) -> dict[str, Any]:
        """Served version and directory, the last refusal, and swap/refusal counts."""
        refused = self.refused
        return {
            "serving": self._served.version,
            "path": str(self._served.path),
            "refused": None
            if refused is None
            else {
                "version": refused.version,
                "path": str(refused.path),
                "error": refused.error,
                "at": refused.at,
            },
            "swaps": self.swaps,
            "refusals": self.refusals,
        }

    async def check_once(self) -> Outcome:
        """Look at ``current`` once; load, verify and swap in a new target.

        Returns ``unchanged`` (already served), ``skipped`` (refused recently), ``swapped``
        or ``refused``.
        """
        async with self._lock:
            target = await asyncio.to_thread(_resolve, self.root / CURRENT)
            if target == self._served.path:
                return "unchanged"
            refused = self.refused
            if (
                refused is not None
                and refused.path == target
                and time.time() - refused.at < self.retry_refused_s
            ):
                return "skipped"
            started = time.perf_counter()
            result = await asyncio.to_thread(_attempt, self._load, target, self._served)
            seconds = time.perf_counter() - started
            LOAD_SECONDS.labels(self.service).set(seconds)
            if isinstance(result, str):
                self._refuse(target, result)
                return "refused"
            self._swap(result, seconds)
            return "swapped"

    def _refuse(self, target: Path, error: str) -> None:
        self.refused = Refusal(target, target.name, error, time.time())
        self.refusals += 1
        SWAPS.labels(self.service, "refused").inc()
        self._publish()
        log.error(
            "artifact set refused; still serving %s: %s",
            self._served.version,
            error,
            extra={
                "fields": {
                    "event": "artifact_refused",
                    "refused_version": target.name,
                    "refused_path": str(target),
                    "serving_version": self._served.version,
                    "error": error,
                }
            },
        )

    def _swap(self, candidate: M, seconds: float) -> None:
        previous = self._served
        self._install(candidate)
        self._served = candidate
        if self.refused is not None and self.refused.path == candidate.path:
            self.refused = None
        self.swaps += 1
        SWAPS.labels(self.service, "swapped").inc()
        self._publish()
        log.info(
            "artifact set swapped: %s -> %s",
            previous.version,
            candidate.version,
            extra={
                "fields": {
                    "event": "artifact_swapped",
                    "from_version": previous.version,
                    "to_version": candidate.version,
                    "load_s": round(seconds, 3),
                }
            },
        )
        holder = [previous]
        del previous
        task = asyncio.create_task(self._retire(holder))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, holder: list[M]) -> None:
        """Drop the last reference to a replaced set in a worker thread, after a grace period.

        Requests that started before the swap hold the set until they finish; once they have,
        freeing it (an index can be hundreds of MB) happens off the event loop.
        """
        await asyncio.sleep(self.retire_after_s)
        await asyncio.to_thread(holder.clear)

    def _publish(self) -> None:
        INFO.labels(self.service).info(
            {
                "serving": self._served.version,
                "refused": self.refused.version if self.refused is not None else "",
            }
        )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check_once()
            except Exception:  # the watcher must outlive any surprise; the set keeps serving
                log.exception("artifact watch failed; still serving %s", self._served.version)

    async def start(self) -> None:
        """Poll in the background (unless ``poll_s`` <= 0)."""
        if self.poll_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._poll())
            log.info(
                "watching artifacts",
                extra={
                    "fields": {
                        "current": str(self.root / CURRENT),
                        "poll_s": self.poll_s,
                        "serving_version": self._served.version,
                    }
                },
            )

    async def stop(self) -> None:
        """Stop polling and release retired sets now."""
        tasks = [t for t in (self._task, *self._retiring) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _resolve(link: Path) -> Path:
    """Where ``link`` points now (itself, unresolved, when missing or dangling)."""
    return link.resolve()


def _attempt(load: Callable[[Path, M], M], target: Path, served: M) -> M | str:
    """``load(target, served)``, or the reason it failed.

    Runs in the worker thread. Failures come back as a message, not an exception: the
    traceback would keep the half-loaded candidate alive until the event loop dropped it,
    and freeing it there is what this module avoids.
    """
    try:
        return load(target, served)
    except RecMeshError as exc:
        message = exc.message
    except Exception as exc:  # a loader bug or an unexpected library error refuses the set too
        message = f"{type(exc).__name__}: {exc}"
    # ArtifactErrors name the file; anything else (e.g. head weights) gets the set's path.
    return message if str(target) in message else f"{target}: {message}"
