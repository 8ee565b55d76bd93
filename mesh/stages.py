"""Timing of funnel stages into ``StageReport`` messages, ``stage.<name>`` spans and the
``recmesh_stage_seconds`` histogram: one lap is reported, traced and measured at once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from recmesh.common.v1 import common_pb2

from mesh import tracing
from mesh.metrics import STAGE_SECONDS


@dataclass
class StageClock:
    """Collects one report per stage; ``degraded`` lists the stages that fell back."""

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
        STAGE_SECONDS.labels(stage).observe(now - self._started)
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
