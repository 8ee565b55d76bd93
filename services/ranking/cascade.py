"""One request through the cascade: item features → pre-rank → heavy ranker → re-rank.

Every stage gets a budget from :class:`~services.ranking.budget.StagePlanner` and
degrades rather than fails when it cannot finish inside it; each degradation is named
in ``degraded``, explained in the stage's ``StageReport`` (candidates in/out, time,
budget, reason, details) and counted in ``recmesh_ranking_degraded_total``.

=============  ===========================================================  =============
stage          degrades to                                                  reason code
=============  ===========================================================  =============
item_features  the cached rows only (rest ranked last, in retrieval order)  cache_only
               retrieval order when nothing is cached either                unavailable
prerank        the head of the list it had time for, rest in retrieval      partial /
               order                                                        skipped
heavy          heavy scores for the pre-rank head it had time for, the rest  partial /
               in pre-rank order                                            skipped
item_counters  re-rank without the recent-CTR lift for the items that have   unavailable
               no counters held
rerank         score order for the slots diversity had no time for          partial /
                                                                            skipped
=============  ===========================================================  =============

Between the heavy ranker and re-rank, ``item_counters`` takes the decayed impression and
click counters (from the event log, kept by the projector) of re-rank's pool, the only
candidates that use them, from the process's :class:`~services.ranking.counters
.CounterCache`, which fetches them from the feature service in the background (no call
on the request path; at most about a second old). Re-rank turns them into a recent-CTR
lift (:func:`services.ranking.rerank.ctr_lift`) weighted by the policy's ``ctr_weight``;
with a weight of 0 the stage does not run. Items without counters held get no lift; when
that is because the feature service failed, the stage is degraded (``unavailable``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter
from recmesh.common.v1 import common_pb2
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2

from core.experiments.interleaving import (
    TEAM_A,
    inclusion_probabilities,
    random_coins,
    team_draft,
)
from core.explore import Slate, build_slate, reserve_pool, rng_for
from core.validation import matrix_from_proto
from mesh.client import CALL_FAILURES, Downstream, describe_failure
from mesh.stages import StageClock
from services.ranking.budget import CostModel, StagePlanner, score_within
from services.ranking.counters import CounterCache
from services.ranking.item_cache import ItemFeatureCache
from services.ranking.item_changes import ItemChanges
from services.ranking.models import RankingModels
from services.ranking.policy import Arm, RankPolicy
from services.ranking.quality import QualityFactor
from services.ranking.rerank import category_spread, ctr_lift, diversify, mmr
from services.ranking.settings import RankingSettings

log = logging.getLogger(__name__)

EXPLORED = Counter(
    "recmesh_ranking_explore_slots_total", "Slots filled by the exploration policy", ["tenant"]
)

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


INTERLEAVE_EXACT_MAX_ITEMS = 50
"""Longest interleaved answer whose propensities are computed exactly (0.3 ms at 50
items on this machine; at 500 items 10-36 ms, most of ranking's budget)."""


@dataclass
class Degradation:
    """Why a stage gave something up: a metric label and a sentence."""

    code: str
    text: str


@dataclass
class Outcome:
    """The shown list and what the cascade did to get it."""

    item_ids: I64
    scores: F32
    sources: npt.NDArray[np.int32]
    propensities: npt.NDArray[np.float64]
    clock: StageClock
    degradations: dict[str, Degradation] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)
    """Stages that did work (their timing feeds the quality factor)."""
    teams: list[str] = field(default_factory=list)
    """Interleaved requests: the arm key of each shown item (empty otherwise)."""
    support: I64 | None = None
    """Every item the answer could have shown (:attr:`core.explore.Slate.support`); None
    for interleaved requests."""

    def response(self, model_version: str) -> ranking_pb2.RankResponse:
        return ranking_pb2.RankResponse(
            ranked=common_pb2.Candidates(
                item_ids=self.item_ids.tolist(),
                scores=self.scores.tolist(),
                sources=self.sources.tolist(),
                propensities=self.propensities.tolist(),
            ),
            stages=self.clock.reports,
            degraded=self.clock.degraded,
            model_version=model_version,
            teams=self.teams,
            support=[] if self.support is None else self.support.tolist(),
        )


ROW_FAILURES: tuple[type[Exception], ...] = (*CALL_FAILURES, ValueError)
"""A failed read of item rows, or rows of another width than the served ranker's."""


@dataclass
class _Rows:
    matrix: F32 | None
    categories: I32
    have: npt.NDArray[np.bool_]
    hits: int
    fetched: int
    problem: Degradation | None
    from_set: int
    """Rows taken from the served set (no cache, no call)."""


@dataclass
class _Recent:
    """Decayed clicks and impressions of the considered candidates (0 where not read)."""

    clicks: F64
    impressions: F64


@dataclass
class _Picked:
    """Re-rank's choice for one ranker: the chosen head, why it fell short, how many pool
    items had counters, and the pool's size."""

    chosen: I64
    problem: Degradation | None
    counted: int
    pool: int


@dataclass
class _Merged:
    """An interleaved list: shown candidate positions, the team (0 = A) of each, and each
    one's probability of being shown over the draft's coins (0 = not computed)."""

    shown: I64
    teams: list[int]
    propensities: npt.NDArray[np.float64]


@dataclass
class _Trace:
    """One request's stage reports, degradations and the stages that did work."""

    clock: StageClock
    degradations: dict[str, Degradation] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)

    def lap(
        self,
        stage: str,
        problem: Degradation | None,
        *,
        candidates_in: int,
        candidates_out: int,
        budget_s: float,
        details: dict[str, float],
        ran: bool = True,
    ) -> None:
        self.clock.lap(
            stage,
            candidates_in=candidates_in,
            candidates_out=candidates_out,
            budget_s=budget_s,
            degraded_reason=problem.text if problem else "",
        )
        self.clock.reports[-1].details.update(details)
        if problem is not None:
            self.degradations[stage] = problem
        if ran:
            self.ran.add(stage)

    def outcome(
        self,
        ids: I64,
        scores: F32,
        sources: npt.NDArray[np.int32],
        propensities: npt.NDArray[np.float64],
    ) -> Outcome:
        return Outcome(ids, scores, sources, propensities, self.clock, self.degradations, self.ran)


@dataclass
class Cascade:
    """Everything that outlives a request: feature client, cache, costs, quality factors."""

    features: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub]
    settings: RankingSettings
    cache: ItemFeatureCache
    counters: CounterCache
    quality: dict[str, QualityFactor]
    changes: ItemChanges | None = None
    """The tenants' items written through the feature service; None: every row is read
    through the feature service (``RECMESH_RANKING_ITEM_ROWS_FROM_SET=false``)."""
    clock: Callable[[], float] = time.perf_counter
    _costs: dict[str, CostModel] = field(default_factory=dict)
    _costs_version: str = ""

    def costs(self, models: RankingModels) -> dict[str, CostModel]:
        """Cost models of the model set ``models`` (reset when another set is served)."""
        if self._costs_version != models.version or not self._costs:
            self._costs = {"prerank": CostModel(), "heavy": CostModel()}
            self._costs_version = models.version
        return self._costs

    async def run(
        self,
        *,
        models: RankingModels,
        tenant: str,
        request_id: str,
        request: ranking_pb2.RankRequest,
        n: int,
        policy: RankPolicy,
        planner: StagePlanner,
        user: F32,
        clock: StageClock,
        arms: Sequence[Arm] = (),
    ) -> Outcome:
        """Rank ``request.candidates`` for ``user`` into at most ``n`` items.

        With two ``arms`` (an interleaved request, :meth:`PolicyBook.arms
        <services.ranking.policy.PolicyBook.arms>`) the shared stages run once (item
        features, pre-rank of the most either arm keeps, the heavy ranker over the most
        either keeps when either uses it, the counters of both pools), each arm is
        re-ranked on its own order, without exploration, and the two heads are merged by
        team draft: the outcome names each item's team, its score is its team's, and its
        propensity is its probability of being shown over the draft's coins. ``policy``
        holds the request-wide knobs (candidates, blocked categories, budgets); without
        ``arms`` it is the one ranker's, with the request's heavy mode.
        """
        arms = arms or (Arm("", policy, request.heavy_mode != ranking_pb2.HEAVY_MODE_OFF),)
        trace = _Trace(clock)
        incoming = request.candidates
        all_ids = np.asarray(incoming.item_ids, dtype=np.int64)
        in_scores = np.asarray(incoming.scores or np.zeros(all_ids.size), dtype=np.float32)
        in_sources = np.asarray(incoming.sources or np.zeros(all_ids.size), dtype=np.int32)

        # Item features: the considered head of the list, from the cache and one call.
        q_features = min(self.quality["item_features"].factor, self.quality["prerank"].factor)
        considered = min(all_ids.size, max(n, round(policy.candidates_keep * q_features)))
        ids = all_ids[:considered]
        budget_f = planner.budget("item_features")
        rows = await self._item_rows(models, tenant, ids, budget_f)
        trace.lap(
            "item_features",
            rows.problem,
            candidates_in=int(ids.size),
            candidates_out=int(rows.have.sum()),
            budget_s=budget_f,
            details={
                "from_set": rows.from_set,
                "cache_hits": rows.hits,
                "fetched": rows.fetched,
                "quality_factor": q_features,
                "considered_of": all_ids.size,
            },
        )
        if rows.matrix is None or not rows.have.any():
            keep = np.arange(min(n, all_ids.size))
            outcome = trace.outcome(
                all_ids[keep], in_scores[keep], in_sources[keep], np.ones(keep.size)
            )
            outcome.support = all_ids[keep]  # nothing explored: the shown items, certain
            return outcome

        # Business rule: blocked categories never reach the page (nor exploration).
        blocked = (
            np.isin(rows.categories, np.fromiter(policy.blocked_categories, dtype=np.int32))
            if policy.blocked_categories
            else np.zeros(ids.size, dtype=bool)
        )
        eligible = np.flatnonzero(rows.have & ~blocked)
        featureless = np.flatnonzero(~rows.have & ~blocked)
        clock.reports[-1].details["blocked"] = int(blocked.sum())
        score = in_scores[: ids.size].copy()
        costs = self.costs(models)

        keeps = [max(n, self.quality["heavy"].scale(arm.policy.prerank_keep)) for arm in arms]
        pre_order = self._prerank(
            trace,
            planner,
            models,
            user,
            rows.matrix,
            eligible,
            max(keeps),
            score,
            costs["prerank"],
        )
        survivors = pre_order[: max(keeps)]
        keeps_h = [max(n, self.quality["rerank"].scale(arm.policy.heavy_keep)) for arm in arms]
        pre_score = score.copy()
        heavy_order, heavy_scored = pre_order, 0
        if any(arm.heavy for arm in arms):
            heavy_order, heavy_scored = self._heavy(
                trace,
                planner,
                models,
                user,
                rows.matrix,
                pre_order,
                survivors,
                max(keeps_h),
                score,
                costs["heavy"],
            )
        orders: list[I64] = []
        scores: list[F32] = []
        for arm, arm_keep in zip(arms, keeps, strict=True):
            if not arm.heavy:
                orders.append(pre_order)
                scores.append(pre_score)
            elif len(arms) == 1:
                orders.append(heavy_order)
                scores.append(score)
            else:
                # The arm's own heavy order: the heavy-scored part of its survivors.
                top = pre_order[: min(heavy_scored, arm_keep)]
                by_heavy = top[np.argsort(-score[top], kind="stable")]
                orders.append(np.concatenate([by_heavy, pre_order[top.size :]]))
                arm_score = pre_score.copy()
                arm_score[top] = score[top]
                scores.append(arm_score)
        recent = None
        if any(arm.policy.ctr_weight > 0 for arm in arms):
            pools = [order[:keep] for order, keep in zip(orders, keeps_h, strict=True)]
            pool = pools[0] if len(pools) == 1 else np.unique(np.concatenate(pools))
            recent = self._item_counters(trace, tenant, ids, pool)
        rng = rng_for(request_id, tenant)
        if len(arms) == 2:
            merged = self._interleave(
                trace, planner, arms, rows, recent, orders, keeps_h, featureless, n, rng
            )
            shown = merged.shown
            outcome = trace.outcome(
                ids[shown],
                np.array(
                    [scores[team][p] for p, team in zip(shown, merged.teams, strict=True)],
                    dtype=np.float32,
                ),
                in_sources[shown].copy(),
                merged.propensities,
            )
            outcome.teams = [arms[team].key for team in merged.teams]
            return outcome
        fresh = in_sources == common_pb2.SOURCE_FRESH
        slate = self._rerank(
            trace, planner, policy, rows, recent, orders[0], keeps_h[0], featureless, n, rng, fresh
        )
        explored = int(slate.explored.sum())
        if explored:
            EXPLORED.labels(tenant or "-").inc(explored)
        shown = slate.positions
        sources = in_sources[shown].copy()
        sources[slate.explored] = common_pb2.SOURCE_EXPLORE
        outcome = trace.outcome(ids[shown], scores[0][shown], sources, slate.propensities)
        outcome.support = ids[slate.support]
        return outcome

    def _prerank(
        self,
        trace: _Trace,
        planner: StagePlanner,
        models: RankingModels,
        user: F32,
        matrix: F32,
        eligible: I64,
        keep: int,
        score: F32,
        cost: CostModel,
    ) -> I64:
        """Pre-rank as many eligible candidates as fit; their order, the unscored last.

        The first ``keep`` of the order go on to the heavy ranker.
        """
        budget = planner.budget("prerank")
        pre = score_within(
            lambda a, b: models.prerank_scores(user, matrix[eligible[a:b]]),
            eligible.size,
            budget,
            cost,
            chunk=max(1, eligible.size),
            probe=max(1, eligible.size),
            safety=self.settings.cost_safety,
            clock=self.clock,
        )
        scored = pre.scores.size
        score[eligible[:scored]] = pre.scores
        order = np.concatenate(
            [eligible[:scored][np.argsort(-pre.scores, kind="stable")], eligible[scored:]]
        )
        trace.lap(
            "prerank",
            _partial(scored, eligible.size, budget, "pre-ranked"),
            candidates_in=int(eligible.size),
            candidates_out=int(min(keep, order.size)),
            budget_s=budget,
            details={"scored": scored},
            ran=scored > 0,
        )
        return order

    def _heavy(
        self,
        trace: _Trace,
        planner: StagePlanner,
        models: RankingModels,
        user: F32,
        matrix: F32,
        pre_order: I64,
        survivors: I64,
        keep: int,
        score: F32,
        cost: CostModel,
    ) -> tuple[I64, int]:
        """Heavy-score as many survivors as fit, in pre-rank order; the new order and how
        many were heavy-scored (the first of ``survivors``)."""
        budget = planner.budget("heavy")
        heavy = score_within(
            lambda a, b: models.heavy_scores(user, np.ascontiguousarray(matrix[survivors[a:b]])),
            survivors.size,
            budget,
            cost,
            chunk=self.settings.heavy_chunk,
            probe=self.settings.heavy_probe,
            safety=self.settings.cost_safety,
            clock=self.clock,
        )
        scored = heavy.scores.size
        score[survivors[:scored]] = heavy.scores
        order = np.concatenate(
            [survivors[:scored][np.argsort(-heavy.scores, kind="stable")], pre_order[scored:]]
        )
        trace.lap(
            "heavy",
            _partial(scored, survivors.size, budget, "heavy-scored"),
            candidates_in=int(survivors.size),
            candidates_out=int(min(keep, order.size)),
            budget_s=budget,
            details={
                "scored": scored,
                "calls": heavy.calls,
                "per_candidate_us": (heavy.per_candidate_s or 0.0) * 1e6,
                "quality_factor": self.quality["heavy"].factor,
            },
            ran=scored > 0,
        )
        return order, scored

    def _rerank(
        self,
        trace: _Trace,
        planner: StagePlanner,
        policy: RankPolicy,
        rows: _Rows,
        recent: _Recent | None,
        order: I64,
        keep: int,
        featureless: I64,
        n: int,
        rng: np.random.Generator,
        fresh: npt.NDArray[np.bool_],
    ) -> Slate:
        """Freshness boost, recent-CTR lift and diversity over the first ``keep`` of
        ``order`` (:meth:`_diversify`), then the exploration slots (drawn from what follows
        the chosen items, with ``policy.cold_start_share`` of the pool reserved for the
        ``fresh`` candidates, :func:`core.explore.reserve_pool`)."""
        budget = planner.budget("rerank")
        picked = self._diversify(
            budget, _deadline(self.clock, planner, budget), policy, rows, recent, order, keep, n
        )
        rest = order[~np.isin(order, picked.chosen)]
        final = reserve_pool(
            np.concatenate([picked.chosen, rest, featureless]),
            n,
            policy.explore_share,
            policy.explore_pool,
            fresh,
            policy.cold_start_share,
        )
        slate = build_slate(final, n, policy.explore_share, policy.explore_pool, rng)
        trace.lap(
            "rerank",
            picked.problem,
            candidates_in=picked.pool,
            candidates_out=int(slate.positions.size),
            budget_s=budget,
            details={
                "explored": int(slate.explored.sum()),
                "categories": category_spread(rows.categories[slate.positions]),
                "ctr_counted": picked.counted,
            },
        )
        return slate

    def _interleave(
        self,
        trace: _Trace,
        planner: StagePlanner,
        arms: Sequence[Arm],
        rows: _Rows,
        recent: _Recent | None,
        orders: Sequence[I64],
        keeps: Sequence[int],
        featureless: I64,
        n: int,
        rng: np.random.Generator,
    ) -> _Merged:
        """Re-rank each arm's order (:meth:`_diversify`, no exploration) and merge the two
        heads of ``n`` by team draft, the coins drawn from ``rng``; the shown candidate
        positions, the team of each, and each one's probability of being shown over the
        coins (:func:`~core.experiments.interleaving.inclusion_probabilities`)."""
        budget = planner.budget("rerank")
        deadline = _deadline(self.clock, planner, budget)
        heads: list[list[int]] = []
        problem: Degradation | None = None
        counted = pooled = 0
        for arm, order, keep in zip(arms, orders, keeps, strict=True):
            picked = self._diversify(budget, deadline, arm.policy, rows, recent, order, keep, n)
            rest = order[~np.isin(order, picked.chosen)]
            heads.append(np.concatenate([picked.chosen, rest, featureless])[:n].tolist())
            problem = problem or picked.problem
            counted, pooled = max(counted, picked.counted), pooled + picked.pool
        merged = team_draft(heads[0], heads[1], n, random_coins(rng))
        shown = np.asarray(merged.items, dtype=np.int64)
        trace.lap(
            "rerank",
            problem,
            candidates_in=pooled,
            candidates_out=int(shown.size),
            budget_s=budget,
            details={
                "explored": 0,
                "categories": category_spread(rows.categories[shown]),
                "ctr_counted": counted,
                "interleaved_a": sum(team == TEAM_A for team in merged.teams),
            },
        )
        # Exact propensities cost O(n x draft states) in Python on ranking's event loop:
        # answers longer than INTERLEAVE_EXACT_MAX_ITEMS log 0 ("unknown") instead.
        probabilities = (
            inclusion_probabilities(heads[0], heads[1], n)
            if n <= INTERLEAVE_EXACT_MAX_ITEMS
            else None
        )
        return _Merged(
            shown,
            list(merged.teams),
            np.array([probabilities[p] for p in merged.items])
            if probabilities is not None
            else np.zeros(shown.size),
        )

    def _diversify(
        self,
        budget: float,
        deadline: float,
        policy: RankPolicy,
        rows: _Rows,
        recent: _Recent | None,
        order: I64,
        keep: int,
        n: int,
    ) -> _Picked:
        """The re-ranked head of ``order``: freshness boost, recent-CTR lift and diversity
        over its first ``keep``.

        Relevance is rank-based, ``1 - rank / pool``, plus ``freshness_boost * freshness``
        and ``ctr_weight * ctr_lift`` (the item's decayed clicks and impressions against
        the CTR prior, :func:`~services.ranking.rerank.ctr_lift`); the pool is re-sorted by
        it when either is on.

        Re-rank is the last stage and its remaining slots cost microseconds: its budget
        decides whether diversity runs at all, and only the answer's own deadline cuts it
        short (a scheduling stall inside it is not worth a worse page otherwise).
        """
        pool = order[:keep]
        pool_size = int(pool.size)
        relevance = 1.0 - np.arange(pool.size, dtype=np.float64) / max(1, pool.size)
        boost = np.zeros(pool.size, dtype=np.float64)
        if policy.freshness_boost and rows.matrix is not None:
            freshness = rows.matrix[pool, self.settings.freshness_column].astype(np.float64)
            boost += policy.freshness_boost * freshness
        counted = 0
        if policy.ctr_weight and recent is not None:
            clicks, impressions = recent.clicks[pool], recent.impressions[pool]
            counted = int(np.count_nonzero((clicks > 0) | (impressions > 0)))
            boost += policy.ctr_weight * ctr_lift(
                clicks,
                impressions,
                self.settings.ctr_prior_clicks,
                self.settings.ctr_prior_impressions,
            )
        if boost.any():
            relevance = relevance + boost
            by_relevance = np.argsort(-relevance, kind="stable")
            pool, relevance = pool[by_relevance], relevance[by_relevance]
        slots = min(n, pool.size)
        problem: Degradation | None = None
        if policy.diversity == "none":
            chosen = pool[:slots]
        elif budget <= 0:
            chosen = pool[:slots]
            problem = Degradation("skipped", "no budget left for diversity: score order")
        elif policy.diversity == "cap":
            chosen = diversify(pool, rows.categories, slots, policy.max_per_category)
        else:
            picked = mmr(
                pool,
                rows.categories,
                slots,
                policy.mmr_lambda,
                relevance=relevance,
                deadline=deadline,
                clock=self.clock,
            )
            chosen = picked.chosen
            if picked.diversified < slots:
                problem = Degradation(
                    "partial",
                    f"diversified {picked.diversified} of {slots} slots before the answer's "
                    "deadline; the rest in score order",
                )
        return _Picked(chosen, problem, counted, pool_size)

    def _item_counters(self, trace: _Trace, tenant: str, ids: I64, pool: I64) -> _Recent:
        """The counters held for re-rank's ``pool`` (positions into ``ids``), from the
        process's :class:`~services.ranking.counters.CounterCache`: no call on the request
        path. Items without counters held get none (a lift of 0); when that is because the
        feature service failed, the stage is degraded (``unavailable``)."""
        held = self.counters.lookup(tenant, ids[pool])
        clicks = np.zeros(ids.size, dtype=np.float64)
        impressions = np.zeros(ids.size, dtype=np.float64)
        clicks[pool], impressions[pool] = held.clicks, held.impressions
        problem = (
            Degradation(
                "unavailable",
                f"item counters unavailable ({held.problem}); {int((~held.known).sum())} of "
                f"{pool.size} re-ranked without recent CTR",
            )
            if held.problem
            else None
        )
        trace.lap(
            "item_counters",
            problem,
            candidates_in=int(pool.size),
            candidates_out=int(held.known.sum()),
            budget_s=0.0,
            details={},
        )
        return _Recent(clicks, impressions)

    async def _item_rows(
        self, models: RankingModels, tenant: str, ids: I64, budget_s: float
    ) -> _Rows:
        """Rows of ``ids``: the served set's own rows for its items (unless the tenant
        wrote an item's row through the feature service: :mod:`~services.ranking
        .item_changes`), then the cache, then one call for the rest."""
        started = self.clock()
        from_set = np.zeros(ids.size, dtype=bool)
        changed = await self.changes.changed(tenant, budget_s) if self.changes is not None else None
        if changed is not None:
            from_set = (ids >= 0) & (ids < models.n_items)
            if changed.size:
                from_set &= ~np.isin(ids, changed)
        budget_s = max(0.0, budget_s - (self.clock() - started))
        matrix = np.zeros((ids.size, models.item_dim), dtype=np.float32)
        categories = np.full(ids.size, -1, dtype=np.int32)
        in_set = ids[from_set]
        matrix[from_set] = models.item_features[in_set]
        categories[from_set] = models.item_categories[in_set]
        rest = np.flatnonzero(~from_set)
        cached = self.cache.lookup(tenant, ids[rest].tolist())
        have = from_set.copy()
        have[rest[cached.hit]] = True
        if cached.hit.any():
            matrix[rest[cached.hit]] = cached.rows
            categories[rest[cached.hit]] = cached.categories
        missing = rest[~cached.hit]
        fetched = 0
        problem: Degradation | None = None
        if missing.size and budget_s <= 0:
            # Planned, not a failure: counted and explained, not logged.
            problem = _without_features(have, ids.size, "no budget left for the read")
        elif missing.size:
            try:
                reply = await self.features.call(
                    self.features.stub.GetItemFeatures,
                    feature_pb2.GetItemFeaturesRequest(item_ids=ids[missing].tolist()),
                    cap_s=budget_s,
                    idempotent=True,
                )
                rows = matrix_from_proto(reply.features, missing.size, "features")
                if rows.shape[1] != models.item_dim:
                    raise ValueError(
                        f"the feature service's item rows have {rows.shape[1]} values, the "
                        f"served set's ranker takes {models.item_dim}"
                    )
                row_categories = np.asarray(reply.categories, dtype=np.int32)
                matrix[missing] = rows
                categories[missing] = row_categories
                have[missing] = True
                fetched = int(missing.size)
                unknown = set(reply.missing_item_ids)
                known = [i for i, item in enumerate(ids[missing].tolist()) if item not in unknown]
                self.cache.put(
                    tenant, ids[missing][known].tolist(), rows[known], row_categories[known]
                )
            except ROW_FAILURES as exc:
                log.warning("item features unavailable: %s", describe_failure(exc))
                problem = _without_features(have, ids.size, describe_failure(exc))
        return _Rows(
            matrix if have.any() else None,
            categories,
            have,
            int(cached.hit.sum()),
            fetched,
            problem,
            int(from_set.sum()),
        )


def warm_up_paths() -> None:
    """Run the numpy paths of re-rank and exploration once.

    Some numpy functions pay a one-off initialisation on first use (``Generator.choice``
    about 12 ms here), which would otherwise land on the first request's budget.
    """
    order = np.arange(64, dtype=np.int64)
    categories = (order % 7).astype(np.int32)
    mmr(order, categories, 10, 0.5, deadline=time.perf_counter() + 1.0)
    diversify(order, categories, 10, 2)
    np.isin(order, order[:5])
    build_slate(order, 10, 0.3, 20, rng_for("warm-up", ""))
    category_spread(categories)


def _deadline(clock: Callable[[], float], planner: StagePlanner, budget: float) -> float:
    """When re-rank must stop: the answer's deadline, or its budget from now without one."""
    answer_within = planner.answer_within()
    return clock() + (budget if answer_within is None else answer_within)


def _without_features(have: npt.NDArray[np.bool_], total: int, why: str) -> Degradation:
    held = int(have.sum())
    if held:
        return Degradation(
            "cache_only",
            f"item features unavailable ({why}); ranked the {held} of {total} candidates "
            "whose rows were held (the set's or cached), the rest last",
        )
    return Degradation("unavailable", f"item features unavailable ({why}); retrieval order")


def _partial(done: int, total: int, budget_s: float, what: str) -> Degradation | None:
    if done >= total:
        return None
    if done == 0:
        return Degradation(
            "skipped", f"no time for any of {total} candidates in {budget_s * 1000:.2f} ms"
        )
    return Degradation(
        "partial", f"{what} {done} of {total} candidates within {budget_s * 1000:.2f} ms"
    )
