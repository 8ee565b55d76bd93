"""``recmesh.ranking.v1.RankingService``: pre-rank → heavy ranker → re-rank, inside a budget.

The cascade itself is :mod:`services.ranking.cascade`; this module checks the request,
resolves the tenant's policy and the stage budgets, runs the cascade and records its
timings (metrics and the adaptive quality factors).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge
from recmesh.common.v1 import common_pb2
from recmesh.feature.v1 import feature_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from core.validation import check_user_id, vector_from_bytes
from mesh.client import Downstream
from mesh.context import budget_var, request_id_var, tenant_var
from mesh.cpu import CpuAccount
from mesh.errors import InvalidArgument
from mesh.stages import StageClock
from services.ranking.budget import STAGES, StagePlanner
from services.ranking.cascade import Cascade, Outcome, warm_up_paths
from services.ranking.counters import CounterCache
from services.ranking.item_cache import ItemFeatureCache
from services.ranking.item_changes import ItemChanges
from services.ranking.models import RankingModels
from services.ranking.policy import PolicyBook
from services.ranking.quality import QualityFactor
from services.ranking.settings import RankingSettings

log = logging.getLogger(__name__)

COUNTER_BATCH = 5000
"""Most items one counters fetch asks for: the feature service's default batch limit
(``RECMESH_FEATURE_MAX_BATCH``)."""

DEGRADED = Counter(
    "recmesh_ranking_degraded_total",
    "Ranking stages that degraded, by stage, reason code and tenant",
    ["stage", "reason", "tenant"],
)

CANDIDATES_SCORED = Counter(
    "recmesh_tenant_candidates_scored_total",
    "Candidates ranking scored for a tenant, by stage (prerank and heavy: scored by the "
    "model; rerank: in re-rank's pool)",
    ["tenant", "stage"],
)

QUALITY = Gauge(
    "recmesh_ranking_quality_factor",
    "Adaptive quality factor of each stage (share of the configured candidate count)",
    ["stage"],
)


def quality_factors(
    settings: RankingSettings, budgets: dict[str, float]
) -> dict[str, QualityFactor]:
    """One quality factor per budgeted stage, its target a share of the stage's budget."""
    return {
        stage: QualityFactor(
            settings.quality_target * budgets[stage],
            minimum=settings.quality_min,
            step=settings.quality_step,
            window=settings.quality_window,
            every=settings.quality_every,
        )
        for stage in STAGES
    }


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Ranks a candidate list for one user within the request's deadline (or, for an
    interleaved request, two rankings of it merged by team draft).

    Without item features (feature service down, nothing cached) the candidates keep
    their incoming order and ``item_features`` is named in ``degraded``; without user
    features the view default (zeros) is used and ``user_features`` is named. See
    :mod:`services.ranking.cascade` for how each stage degrades.

    Args:
        models: the served model set; the hot swap replaces the ``models`` attribute and a
            request reads it once.
        features: feature service stub.
        settings: service settings (defaults of every policy knob).
        policies: per-tenant policies (default: loaded from ``settings.policies``).
        cache: item feature cache (default: sized by ``settings``).
        counters: item counter cache (default: one reading ``features``, per ``settings``).
    """

    def __init__(
        self,
        models: RankingModels,
        features: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        settings: RankingSettings,
        *,
        policies: PolicyBook | None = None,
        cache: ItemFeatureCache | None = None,
        counters: CounterCache | None = None,
    ) -> None:
        self.models = models
        self._settings = settings
        self.policies = policies if policies is not None else PolicyBook.load(settings)
        cache = (
            cache
            if cache is not None
            else ItemFeatureCache(int(settings.item_cache_mb * 2**20), settings.item_cache_ttl_s)
        )
        self.cascade = Cascade(
            features=features,
            settings=settings,
            cache=cache,
            changes=ItemChanges(
                features, refresh_s=settings.item_changes_refresh_s, forget=cache.forget
            )
            if settings.item_rows_from_set
            else None,
            counters=counters
            if counters is not None
            else CounterCache(
                features,
                refresh_s=settings.counters_refresh_s,
                max_age_s=settings.counters_max_age_s,
                max_entries=settings.counters_entries,
                batch=COUNTER_BATCH,
            ),
            quality=quality_factors(settings, dict(self.policies.default.budgets)),
        )
        for stage, quality in self.cascade.quality.items():
            QUALITY.labels(stage).set(quality.factor)
        self.cpu = CpuAccount("ranking")
        """The CPU this service spends per tenant; each answer reports its call's
        (``cost.cpu_us``, ``mesh.cpu``)."""
        warm_up_paths()

    def _validate(self, request: ranking_pb2.RankRequest) -> int:
        check_user_id(request.user_id)
        n = request.num_items or 10
        if not 0 < n <= self._settings.max_items:
            raise InvalidArgument(
                f"num_items must be in 1..{self._settings.max_items}", field="num_items"
            )
        candidates = request.candidates
        if len(candidates.item_ids) > self._settings.max_candidates:
            raise InvalidArgument(
                f"at most {self._settings.max_candidates} candidates", field="candidates.item_ids"
            )
        for name in ("scores", "sources"):
            if len(getattr(candidates, name)) not in (0, len(candidates.item_ids)):
                raise InvalidArgument(
                    f"candidates.{name} must be empty or as long as item_ids",
                    field=f"candidates.{name}",
                )
        return n

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: Any
    ) -> ranking_pb2.RankResponse:
        """The ranked list; ``cost`` says what the call cost: CPU (``mesh.cpu``) and the
        candidates each stage scored (:func:`candidates_scored`)."""
        response, cpu_s = await self.cpu.serve(tenant_var.get(), self._rank(request))
        response.cost.cpu_us = round(cpu_s * 1e6)
        return response

    async def _rank(self, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        n = self._validate(request)
        tenant = tenant_var.get()
        policy = self.policies.resolve(tenant, request)
        arms = self.policies.arms(policy, request)
        models = self.models
        planner = StagePlanner(
            policy.budgets,
            budget_var.get(),
            self._settings.reply_margin_s,
            self._settings.stage_reserve_s,
        )
        clock = StageClock("ranking")
        user_reason = ""
        if request.user_features:
            user = vector_from_bytes(request.user_features, models.user_dim, "user_features")
        else:
            user = np.zeros(models.user_dim, dtype=np.float32)
            user_reason = "no user features sent"
        clock.lap("user_features", degraded_reason=user_reason)
        outcome = await self.cascade.run(
            models=models,
            tenant=tenant,
            request_id=request_id_var.get(),
            request=request,
            n=n,
            policy=policy,
            planner=planner,
            user=user,
            clock=clock,
            arms=arms,
        )
        self._record(outcome, tenant)
        response = outcome.response(models.version)
        scored = candidates_scored(outcome.clock.reports)
        response.cost.candidates_scored.update(scored)
        for stage, count in scored.items():
            CANDIDATES_SCORED.labels(tenant or "-", stage).inc(count)
        return response

    def _record(self, outcome: Outcome, tenant: str) -> None:
        """Stage timings into the quality factors (the stage histogram is the clock's own);
        degradations counted."""
        quality = self.cascade.quality
        for report in outcome.clock.reports:
            if report.stage not in quality:
                continue
            seconds = report.elapsed_ms / 1000
            if report.stage in outcome.ran:
                quality[report.stage].observe(seconds)
                QUALITY.labels(report.stage).set(quality[report.stage].factor)
        for stage, degradation in outcome.degradations.items():
            DEGRADED.labels(stage, degradation.code, tenant or "-").inc()


def candidates_scored(reports: Sequence[common_pb2.StageReport]) -> dict[str, int]:
    """Candidates each stage of one request scored, from its stage reports: ``prerank``
    and ``heavy`` the candidates their model scored (``details["scored"]``), ``rerank`` the
    candidates in its pool (``candidates_in``: each one's relevance is computed); stages
    that did not run are left out."""
    scored: dict[str, int] = {}
    for report in reports:
        if report.stage in ("prerank", "heavy") and "scored" in report.details:
            scored[report.stage] = scored.get(report.stage, 0) + int(report.details["scored"])
        elif report.stage == "rerank":
            scored["rerank"] = scored.get("rerank", 0) + report.candidates_in
    return scored
