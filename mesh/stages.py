"""The one stage timer of the mesh: every stage of a request, in the gateway's funnel or
in a service's handler, is timed into the ``recmesh_stage_seconds{service, stage}``
histogram and a ``stage.<name>`` span, once.

Two shapes, one histogram: :func:`timed` awaits a stage's work inside its span (the
gateway's quota, experiment, retrieval and ranking calls); :class:`StageClock` laps stages
that run one after another and also reports each as a ``StageReport`` message (the
ranking cascade)."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import Histogram
from recmesh.common.v1 import common_pb2

from mesh import tracing

T = TypeVar("T")

STAGE_SECONDS = Histogram(
    "recmesh_stage_seconds",
    "Time of each stage of a request, by the service that ran it (mesh.stages)",
    ["service", "stage"],
    buckets=(
        0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.075,
        0.1, 0.25, 0.5, 1.0,
    ),
)  # fmt: skip


async def timed(service: str, stage: str, budget_s: float, work: Awaitable[T]) -> T:
    """Await ``work`` inside a ``stage.<stage>`` span and time it into the histogram
    (also when it fails)."""
    started = time.perf_counter()
    with tracing.stage_span(stage, budget_ms=round(budget_s * 1000, 3)):
        try:
            return await work
        finally:
            STAGE_SECONDS.labels(service, stage).observe(time.perf_counter() - started)


@dataclass
class StageClock:
    """Collects one report per stage of ``service``; ``degraded`` lists the stages that
    fell back."""

    service: str
    reports: list[common_pb2.StageReport] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)
    _started_ns: int = field(default_factory=time.time_ns)

    def lap(
        self,
        stage: str,
        *,
        candidates_in: int = 0,
        candidates_out: int = 0,
        budget_s: float = 0.0,
        degraded_reason: str = "",
    ) -> None:
        """Close the stage that started at the previous lap (or at construction).

        The stage's span is a child of the current span (the handler's SERVER span).
        """
        now = time.perf_counter()
        now_ns = time.time_ns()
        STAGE_SECONDS.labels(self.service, stage).observe(now - self._started)
        tracing.record_stage(
            stage,
            self._started_ns,
            now_ns,
            budget_ms=budget_s * 1000.0 if budget_s else None,
            candidates_in=candidates_in or None,
            candidates_out=candidates_out or None,
            degraded_reason=degraded_reason or None,
        )
        self.reports.append(
            common_pb2.StageReport(
                stage=stage,
                elapsed_ms=(now - self._started) * 1000.0,
                budget_ms=budget_s * 1000.0,
                candidates_in=candidates_in,
                candidates_out=candidates_out,
                degraded=bool(degraded_reason),
                reason=degraded_reason,
            )
        )
        if degraded_reason:
            self.degraded.append(stage)
        self._started = now
        self._started_ns = now_ns
