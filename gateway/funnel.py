"""Orchestration of one recommendation: quota → experiments → retrieval → ranking.

Each stage is capped by its own budget and by what is left of the request's
deadline. A failing stage falls back instead of failing the request (see the brief):
quota down → fail open/closed by setting; experiment down (and the user's assignment not
cached) → control variants; retrieval down → the tenant's cached popular items; ranking
down → retrieval order. Every fallback is named in ``degraded``. Impressions are queued
for delivery once the answer is ready (``gateway.impressions``), off the request path, and
so are the request's exposures to experiment variants (once admitted) and, when it fails
after admission, its error (``gateway.exposures``).

Tracing: each stage runs in a ``stage.<name>`` span (budget, candidate counts, breaker
state, degraded reason as ``recmesh.*`` attributes) under the request's SERVER span, which
gets the tenant, request id, experiments and degraded stages. The ``stage.impressions``
span is a child of the request; the delivery of its events is its own trace linked to it
(``impressions.deliver``, or ``outbox.deliver`` when they went through the outbox).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import Counter
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2
from recmesh.experiment.v1 import experiment_pb2
from recmesh.ranking.v1 import ranking_pb2
from recmesh.retrieval.v1 import retrieval_pb2

from core.catalog import is_live, name_of
from core.experiments.assign import control_params
from core.experiments.book import ExperimentBook
from core.validation import check_user_id
from gateway import exposures
from gateway.admission import AdmissionControl
from gateway.assignments import AssignmentCache
from gateway.clients import Downstreams
from gateway.fallback import PopularFallback
from gateway.impressions import ImpressionShipper
from gateway.knobs import Knobs, interleave_arms
from gateway.outbox import Outbox
from gateway.quota import Admission, QuotaLeases
from gateway.settings import GatewaySettings
from gateway.usage import UsageLedger
from mesh import tracing
from mesh.client import CALL_FAILURES, describe_failure
from mesh.context import Budget, budget_var, request_id_var, tenant_var
from mesh.errors import InvalidArgument, RecMeshError, ResourceExhausted, Unavailable
from mesh.stages import timed

log = logging.getLogger(__name__)

DownstreamFailure = CALL_FAILURES
"""Failures of a downstream call that the funnel answers with a fallback."""

OUTBOX_FULL = Counter(
    "recmesh_gateway_events_refused_backlog_total",
    "Events posted to /v1/events refused (429) because the outbox held too many undelivered",
)
DEGRADED = Counter(
    "recmesh_gateway_degraded_total",
    "Requests answered with a stage fallen back, by stage and tenant",
    ["stage", "tenant"],
)
QUOTA_DECISIONS = Counter(
    "recmesh_gateway_quota_decisions_total",
    "Quota answers per tenant: allowed, denied, or unavailable (quota service down)",
    ["tenant", "decision"],
)
QUOTA_SOURCES = Counter(
    "recmesh_gateway_quota_sources_total",
    "Quota decisions per tenant by where they came from: a quota call, a leased token, "
    "or a remembered denial (gateway/quota.py)",
    ["tenant", "source"],
)
ASSIGNMENT_CACHE = Counter(
    "recmesh_gateway_assignment_cache_total",
    "Experiment assignments looked up in the gateway's cache: hit, or miss (the experiment "
    "service was asked; gateway/assignments.py)",
    ["result"],
)


@dataclass
class Recommendation:
    """The answer to one request, as both APIs render it."""

    request_id: str
    item_ids: list[int]
    item_names: list[str]
    """The tenant's own id of each item (``core.catalog``), parallel to ``item_ids``."""
    scores: list[float]
    sources: list[int]
    experiments: list[tuple[str, str]]
    degraded: list[str]
    stage_ms: dict[str, float]
    stages: list[common_pb2.StageReport] = field(default_factory=list)
    propensities: list[float] = field(default_factory=list)
    """Probability each shown item had of being shown (parallel to ``item_ids``; empty
    when ranking did not answer, e.g. on a fallback)."""
    retrieval_version: str = ""
    ranking_version: str = ""
    """Artifact-set versions that served the answer ("" where that stage did not answer)."""
    latency_ms: float = 0.0
    """Time from the request's arrival in the funnel to the answer being ready."""
    teams: list[str] = field(default_factory=list)
    """Interleaved answers: the arm whose team-draft pick each shown item was (parallel to
    ``item_ids``; empty otherwise, e.g. when ranking did not answer)."""
    support: list[int] = field(default_factory=list)
    """Every item ranking's answer could have shown (``RankResponse.support``), logged on
    the first impression; empty when ranking did not answer or interleaved."""


class Funnel:
    """Runs the funnel for one tenant's request against the downstream services."""

    def __init__(
        self,
        settings: GatewaySettings,
        downstreams: Downstreams,
        book: ExperimentBook,
        outbox: Outbox,
        fallback: PopularFallback,
        assignments: AssignmentCache,
        quota: QuotaLeases,
        admission: AdmissionControl,
    ) -> None:
        self._settings = settings
        self._admission = admission
        self._quota_leases = quota
        self._outbox = outbox
        self._fallback = fallback
        self._ds = downstreams
        self._book = book
        self._knobs = exposures.experiment_knobs(book)
        self._assignments = assignments
        self._exposed = exposures.ExposureMemo(settings.exposure_memo_entries)
        self.impressions = ImpressionShipper(
            outbox,
            self.deliver,
            batch_rows=settings.impressions_batch,
            linger_s=settings.impressions_linger_s,
        )
        """Where the impressions of answers go; its owner starts and stops it."""
        self.usage = UsageLedger(downstreams.quota, flush_s=settings.usage_flush_s)
        """Where the costs answers report go (``gateway.usage``); its owner starts and
        stops it."""

    def validate(self, user_id: str, num_items: int) -> int:
        """``num_items`` once checked.

        Raises:
            InvalidArgument: user_id empty or over 256 bytes, num_items out of 1..max.
        """
        check_user_id(user_id)
        n = num_items
        if not 0 < n <= self._settings.max_items:
            raise InvalidArgument(
                f"num_items must be in 1..{self._settings.max_items}", field="num_items"
            )
        return n

    def refuse_if_denied(self, tenant: str) -> None:
        """Refuse ``tenant`` at once if it is known to be over its quota (a remembered
        denial, no call): before any other work, so that a tenant far over its quota costs
        the others next to nothing. The HTTP API calls it before it parses the body.

        Raises:
            ResourceExhausted: the tenant is over its quota, with its retry-after.
        """
        denial = self._quota_leases.denied(tenant)
        if denial is not None:
            QUOTA_SOURCES.labels(tenant, "denial").inc()
            QUOTA_DECISIONS.labels(tenant, "denied").inc()
            tracing.annotate(tenant=tenant, quota_allowed=False, quota_source="denial")
            raise _over_quota(tenant, denial)

    async def recommend(
        self,
        tenant: str,
        user_id: str,
        num_items: int,
        deadline_s: float | None = None,
        request_id: str = "",
    ) -> Recommendation:
        """Run the funnel. ``deadline_s`` (capped by the configured deadline) bounds it all.

        Raises:
            InvalidArgument: bad user_id or num_items.
            Overloaded: refused at admission, before any other work (``gateway.admission``).
            ResourceExhausted: the tenant is over quota.
            Unavailable: neither retrieval nor the fallback cache can produce items.
        """
        n = self.validate(user_id, num_items)
        self.refuse_if_denied(tenant)
        with self._admission.admit(tenant) as ticket:
            result = await self._recommend(tenant, user_id, n, deadline_s, request_id)
            ticket.served = True
            return result

    async def _recommend(
        self, tenant: str, user_id: str, n: int, deadline_s: float | None, request_id: str
    ) -> Recommendation:
        """The funnel of an admitted request (see :meth:`recommend`)."""
        arrived = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        tenant_var.set(tenant)
        request_id_var.set(request_id)
        limit = self._settings.deadline_s
        deadline = limit if deadline_s is None else min(deadline_s, limit)
        # Stages may use the deadline minus the time the gateway needs to send the answer.
        budget = Budget(max(0.0, deadline - self._settings.reply_margin_s))
        budget_var.set(budget)
        tracing.annotate(tenant=tenant, request_id=request_id, num_items=n)
        stage_ms: dict[str, float] = {}
        degraded: list[str] = []
        settings = self._settings

        started = time.perf_counter()
        quota, (experiments, book_version) = await asyncio.gather(
            timed("gateway", "quota", settings.quota_budget_s, self._quota(degraded)),
            timed(
                "gateway",
                "experiment",
                settings.experiment_budget_s,
                self._experiments(tenant, user_id, degraded),
            ),
        )
        stage_ms["admission"] = (time.perf_counter() - started) * 1000
        if quota is not None:
            QUOTA_DECISIONS.labels(tenant, "allowed" if quota.allowed else "denied").inc()
        if quota is not None and not quota.allowed:
            tracing.annotate(quota_allowed=False)
            raise _over_quota(tenant, quota)
        params: dict[str, str] = {}
        for assignment in experiments:
            params.update(assignment.params)
        knobs = Knobs.from_variants(params)
        knobs.interleave = interleave_arms(experiments)
        if book_version:
            self.impressions.put(
                tenant,
                exposures.exposures(
                    self._exposed,
                    tenant,
                    user_id,
                    request_id,
                    exposures.applied(experiments, params, self._knobs),
                    book_version,
                    int(time.time() * 1000),
                ),
            )
        try:
            result = await self._answer(
                tenant, user_id, n, request_id, experiments, knobs, degraded, stage_ms
            )
        except Exception as exc:
            if experiments:
                code = exc.grpc_code.name if isinstance(exc, RecMeshError) else "INTERNAL"
                error = exposures.error_event(
                    user_id,
                    request_id,
                    {a.experiment_key: a.variant_key for a in experiments},
                    degraded,
                    code,
                    (time.perf_counter() - arrived) * 1000,
                    int(time.time() * 1000),
                )
                self.impressions.put(tenant, [error])
            raise
        result.latency_ms = (time.perf_counter() - arrived) * 1000
        self._log_impressions(tenant, user_id, result)
        return result

    async def _answer(
        self,
        tenant: str,
        user_id: str,
        n: int,
        request_id: str,
        experiments: list[experiment_pb2.Assignment],
        knobs: Knobs,
        degraded: list[str],
        stage_ms: dict[str, float],
    ) -> Recommendation:
        """Retrieval and ranking of an admitted request, with their fallbacks.

        Raises:
            Unavailable: neither retrieval nor the fallback cache can produce items.
        """
        settings = self._settings
        started = time.perf_counter()
        retrieved = await timed(
            "gateway",
            "retrieval",
            settings.retrieval_budget_s,
            self._retrieve(tenant, user_id, knobs, degraded),
        )
        stage_ms["retrieval"] = (time.perf_counter() - started) * 1000

        started = time.perf_counter()
        ranked = await timed(
            "gateway",
            "ranking",
            settings.ranking_budget_s,
            self._rank(user_id, n, retrieved, knobs, degraded),
        )
        stage_ms["ranking"] = (time.perf_counter() - started) * 1000
        costs = {"retrieval": retrieved.cost}
        if ranked is not None:
            costs["ranking"] = ranked.cost
        self.usage.add(tenant, costs)
        candidates = ranked.ranked if ranked is not None else _head(retrieved.candidates, n)

        stages = [*retrieved.stages, *(ranked.stages if ranked is not None else [])]
        degraded += [d for d in retrieved.degraded if d not in degraded]
        if ranked is not None:
            degraded += [d for d in ranked.degraded if d not in degraded]
        for stage in degraded:
            DEGRADED.labels(stage=stage, tenant=tenant).inc()
        tracing.annotate(
            experiments=[f"{a.experiment_key}={a.variant_key}" for a in experiments],
            degraded=bool(degraded),
            degraded_stages=degraded,
            items=len(candidates.item_ids),
        )
        result = Recommendation(
            request_id=request_id,
            item_ids=list(candidates.item_ids),
            item_names=[name_of(i, retrieved.names) for i in candidates.item_ids],
            scores=list(candidates.scores),
            sources=list(candidates.sources),
            experiments=[(a.experiment_key, a.variant_key) for a in experiments],
            degraded=degraded,
            stage_ms=stage_ms,
            stages=stages,
            propensities=list(candidates.propensities),
            retrieval_version=retrieved.model_version,
            ranking_version=ranked.model_version if ranked is not None else "",
            teams=list(ranked.teams) if ranked is not None else [],
            support=list(ranked.support) if ranked is not None else [],
        )
        return result

    async def _quota(self, degraded: list[str]) -> Admission | None:
        """The request's quota decision, from the tenant's lease or a quota call.

        Returns ``None`` when the quota service failed and the gateway fails open.

        Raises:
            Unavailable: the quota service failed and the gateway is configured fail-closed.
        """
        tenant = tenant_var.get()
        try:
            admission = await self._quota_leases.acquire(tenant)
        except DownstreamFailure as exc:
            log.warning("quota unavailable: %s", describe_failure(exc))
            tracing.mark_degraded(f"quota unavailable: {describe_failure(exc)}")
            QUOTA_DECISIONS.labels(tenant, "unavailable").inc()
            degraded.append("quota")
            if not self._settings.quota_fail_open:
                raise Unavailable("quota service unavailable and configured fail-closed") from exc
            return None
        tracing.annotate(quota_source=admission.source)
        QUOTA_SOURCES.labels(tenant, admission.source).inc()
        return admission

    async def _experiments(
        self, tenant: str, user_id: str, degraded: list[str]
    ) -> tuple[list[experiment_pb2.Assignment], str]:
        """The request's assignments and the version of the book they come from: the
        cached answer for (tenant, user) if one is fresh, else the experiment service's
        answer (then cached), else, the service failing, the control variants of the
        gateway's copy of the book (named in ``degraded``, not cached) with no version
        ("": not a bucketing, nobody is exposed by them)."""
        cached = self._assignments.get(tenant, user_id)
        ASSIGNMENT_CACHE.labels("miss" if cached is None else "hit").inc()
        if cached is not None:
            tracing.annotate(assignment_source="cache")
            return cached, self._assignments.version
        try:
            experiment = self._ds.experiment
            reply = await experiment.call(
                experiment.stub.Assign,
                experiment_pb2.AssignRequest(user_id=user_id),
                cap_s=self._settings.experiment_budget_s,
                idempotent=True,
            )
        except DownstreamFailure as exc:
            log.warning("experiment unavailable: %s", describe_failure(exc))
            tracing.mark_degraded(f"experiment unavailable: {describe_failure(exc)}")
            degraded.append("experiment")
            return [
                experiment_pb2.Assignment(experiment_key=key, variant_key="control", params=params)
                for key, params in control_params(self._book, tenant).items()
            ], ""
        tracing.annotate(assignment_source="service")
        self._assignments.put(tenant, user_id, reply)
        return list(reply.assignments), reply.book_version

    async def _retrieve(
        self, tenant: str, user_id: str, knobs: Knobs, degraded: list[str]
    ) -> retrieval_pb2.RetrieveResponse:
        try:
            retrieval = self._ds.retrieval
            reply = await retrieval.call(
                retrieval.stub.Retrieve,
                retrieval_pb2.RetrieveRequest(user_id=user_id, ann_k=knobs.ann_k),
                cap_s=self._settings.retrieval_budget_s,
                idempotent=True,
            )
        except DownstreamFailure as exc:
            log.warning("retrieval unavailable: %s", describe_failure(exc))
            cached = await self._fallback.get(tenant)
            if cached is None:
                raise Unavailable("retrieval is unavailable and no fallback is cached") from exc
            tracing.mark_degraded(f"retrieval unavailable: {describe_failure(exc)}")
            tracing.annotate(candidates_out=len(cached.candidates.item_ids))
            degraded.append("retrieval")
            return cached
        tracing.annotate(candidates_out=len(reply.candidates.item_ids))
        if reply.degraded:
            tracing.mark_degraded(f"retrieval degraded: {', '.join(reply.degraded)}")
        return reply

    async def _rank(
        self,
        user_id: str,
        n: int,
        retrieved: retrieval_pb2.RetrieveResponse,
        knobs: Knobs,
        degraded: list[str],
    ) -> ranking_pb2.RankResponse | None:
        try:
            ranking = self._ds.ranking
            reply: ranking_pb2.RankResponse = await ranking.call(
                ranking.stub.Rank,
                ranking_pb2.RankRequest(
                    user_id=user_id,
                    user_features=retrieved.user_features,
                    candidates=retrieved.candidates,
                    num_items=n,
                    heavy_mode=knobs.heavy,  # type: ignore[arg-type]
                    **knobs.rank_fields(),
                ),
                cap_s=self._settings.ranking_budget_s,
                idempotent=True,
            )
            tracing.annotate(
                candidates_in=len(retrieved.candidates.item_ids),
                candidates_out=len(reply.ranked.item_ids),
            )
            if reply.degraded:
                tracing.mark_degraded(f"ranking degraded: {', '.join(reply.degraded)}")
            return reply
        except DownstreamFailure as exc:
            log.warning("ranking unavailable: %s", describe_failure(exc))
            tracing.mark_degraded(f"ranking unavailable: {describe_failure(exc)}")
            degraded.append("ranking")
            return None

    def _log_impressions(self, tenant: str, user_id: str, result: Recommendation) -> None:
        """One impression per shown item, carrying the answer's lineage (see ``Event``)."""
        n = len(result.item_ids)
        if not n:
            return
        now_ms = int(time.time() * 1000)
        propensities = result.propensities or [0.0] * n
        scores = result.scores or [0.0] * n
        sources = result.sources or [0] * n
        teams = result.teams if len(result.teams) == n else [""] * n
        variants = dict(result.experiments)
        events = [
            events_pb2.Event(
                event_id=f"{result.request_id}:{position}",
                type="impression",
                user_id=user_id,
                item_id=item_id,
                # The tenant's own items carry their name, so the log (and ``recmesh
                # explain``) shows the tenant's id; the set's items are their number (and
                # a name retrieval did not know is not made up: it would map anew).
                item_ref=name if is_live(item_id) and name != str(item_id) else "",
                request_id=result.request_id,
                ts_ms=now_ms,
                position=position,
                propensity=propensity,
                score=score,
                source=source,
                variants=variants,
                retrieval_version=result.retrieval_version,
                ranking_version=result.ranking_version,
                degraded=result.degraded,
                latency_ms=result.latency_ms,
                team=team,
                support=result.support if position == 0 else (),
            )
            for position, (item_id, name, propensity, score, source, team) in enumerate(
                zip(
                    result.item_ids,
                    result.item_names,
                    propensities,
                    scores,
                    sources,
                    teams,
                    strict=True,
                )
            )
        ]
        with tracing.stage_span("impressions", events=len(events)):
            self.impressions.put(tenant, events)

    async def append_events(self, events: list[events_pb2.Event]) -> None:
        """Accept events of the current tenant: durably in the outbox, delivered later.

        Raises:
            ResourceExhausted: the outbox already holds ``outbox_max_rows`` undelivered
                events (the relay is behind): nothing of this batch is stored, the client
                retries after ``Retry-After``. The gateway's own impressions are not held
                to the limit (they are not retried by anyone).
            OSError / sqlite3.Error: the outbox could not store them (nothing was accepted).
        """
        backlog = self._outbox.rows
        if backlog + len(events) > self._settings.outbox_max_rows:
            OUTBOX_FULL.inc(len(events))
            raise ResourceExhausted(
                f"{backlog} accepted events wait for delivery to the event log; post again shortly",
                retry_after_s=1.0,
            )
        await self._outbox.put(tenant_var.get(), events)

    async def deliver(self, events: list[events_pb2.Event]) -> events_pb2.AppendResponse:
        """Send one batch of the current tenant to the event logger (the impression shipper
        and the outbox relay)."""
        events_ds = self._ds.events
        return await events_ds.call(
            events_ds.stub.Append,
            events_pb2.AppendRequest(events=events),
            cap_s=self._settings.events_timeout_s,
            idempotent=True,
        )


def _over_quota(tenant: str, quota: Admission) -> ResourceExhausted:
    return ResourceExhausted(
        f"tenant {tenant!r} is over its quota of {quota.rate:g} requests/s",
        retry_after_s=quota.retry_after_s,
    )


def _head(candidates: common_pb2.Candidates, n: int) -> common_pb2.Candidates:
    return common_pb2.Candidates(
        item_ids=candidates.item_ids[:n],
        scores=candidates.scores[:n],
        sources=candidates.sources[:n],
    )
