"""Timing of funnel stages into ``StageReport`` messages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from recmesh.common.v1 import common_pb2


@dataclass
class StageClock:
    """Collects one report per stage; ``degraded`` lists the stages that fell back."""

    reports: list[common_pb2.StageReport] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)

    def lap(
        self,
        stage: str,
        *,
        candidates_in: int = 0,
        candidates_out: int = 0,
        budget_s: float = 0.0,
        degraded_reason: str = "",
    ) -> None:
        """Close the stage that started at the previous lap (or at construction)."""
        now = time.perf_counter()
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
