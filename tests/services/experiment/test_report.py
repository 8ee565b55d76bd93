"""Experiment reports from constructed logs: the real experiment service (its report worker
process) reading a real Valkey, the log written by the events service's own append."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from recmesh.events.v1 import events_pb2
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core import keys
from gateway.exposures import exposure_id
from mesh import redis as mesh_redis
from mesh.errors import ResourceExhausted
from mesh.server import MeshServer
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.events.log import RedisStreamEventLog
from services.experiment.report import ReportSpec
from services.experiment.reports import Reports
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

NOW = int(time.time() * 1000) - 3_600_000
GUARDRAILS = {"degraded_share": 0.05, "p99_latency_ms": 120, "error_rate": 0.01}
BOOK: dict[str, Any] = {
    "experiments": [
        {
            "key": "exp",
            "variants": [
                {"key": "control", "weight": 0.5, "params": {"retrieval.k": "300"}},
                {"key": "treat", "weight": 0.5, "params": {"retrieval.k": "600"}},
            ],
            "guardrails": GUARDRAILS,
        },
        {
            "key": "acme-only",
            "tenants": ["acme"],
            "variants": [{"key": "control"}, {"key": "b"}],
        },
        {
            "key": "rankers",
            "type": "interleave",
            "variants": [
                {"key": "heavy", "params": {"ranking.heavy": "on"}},
                {"key": "light", "params": {"ranking.heavy": "off"}},
            ],
        },
    ]
}


@pytest.fixture(scope="module")
async def experiment(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MeshServer]:
    path = tmp_path_factory.mktemp("book") / "experiments.json"
    path.write_text(json.dumps(BOOK), encoding="utf-8")
    settings = ExperimentSettings(port=0, experiments=path, redis_url=redis_url)
    server = await built_server(build_service, settings)
    async with serving(server):
        yield server


class Log:
    """Events of one constructed log of a fresh tenant, in the order they are added."""

    def __init__(self) -> None:
        self.tenant = "r" + uuid.uuid4().hex[:12]
        self.events: list[events_pb2.Event] = []

    def expose(self, user: str, variant: str, version: str = "book1", ts: int = NOW) -> None:
        self.events.append(
            events_pb2.Event(
                event_id=exposure_id(user, "exp", variant, ts),
                type="exposure",
                user_id=user,
                ts_ms=ts,
                variants={"exp": variant},
                book_version=version,
            )
        )

    def answer(
        self,
        user: str,
        variant: str | None,
        items: Sequence[int],
        clicks: Sequence[int] = (),
        conversions: Sequence[int] = (),
        degraded: Sequence[str] = (),
        latency_ms: float = 10.0,
        ts: int = NOW,
    ) -> str:
        """An answer of ``items`` to ``user`` assigned ``variant`` (None: no experiment),
        and the clicks and conversions on some of them."""
        request = uuid.uuid4().hex
        variants = {} if variant is None else {"exp": variant}
        for position, item in enumerate(items):
            self.events.append(
                events_pb2.Event(
                    event_id=f"{request}:{position}",
                    type="impression",
                    user_id=user,
                    item_id=item,
                    request_id=request,
                    ts_ms=ts,
                    position=position,
                    variants=variants,
                    degraded=list(degraded),
                    latency_ms=latency_ms,
                )
            )
        for kind, chosen in (("click", clicks), ("conversion", conversions)):
            for item in chosen:
                self.outcome(kind, user, request, item, ts)
        return request

    def outcome(self, kind: str, user: str, request: str, item: int, ts: int = NOW) -> None:
        self.events.append(
            events_pb2.Event(
                event_id=uuid.uuid4().hex,
                type=kind,
                user_id=user,
                item_id=item,
                request_id=request,
                ts_ms=ts + 1000,
            )
        )

    def error(self, user: str, variant: str, latency_ms: float = 10.0) -> None:
        request = uuid.uuid4().hex
        self.events.append(
            events_pb2.Event(
                event_id=f"{request}:error",
                type="error",
                user_id=user,
                request_id=request,
                ts_ms=NOW,
                variants={"exp": variant},
                attributes={"code": "UNAVAILABLE"},
                latency_ms=latency_ms,
            )
        )

    async def write(self, redis_url: str) -> None:
        client = mesh_redis.client(redis_url)
        log = RedisStreamEventLog(client, 3600)
        for start in range(0, len(self.events), 500):
            await log.append(self.tenant, self.events[start : start + 500])
        await client.aclose()


async def report(server: MeshServer, tenant: str, key: str = "exp") -> experiment_pb2.Report:
    async with channel_to(server) as channel:
        reply: experiment_pb2.Report = await experiment_pb2_grpc.ExperimentServiceStub(
            channel
        ).GetReport(
            experiment_pb2.GetReportRequest(experiment_key=key),
            metadata=tenant_metadata(tenant),
            timeout=60,
        )
    return reply


def by_key(reply: experiment_pb2.Report) -> dict[str, experiment_pb2.VariantReport]:
    return {v.variant_key: v for v in reply.variants}


async def test_counts_ctr_lift_and_cuped_of_a_constructed_log(
    experiment: MeshServer, redis_url: str
) -> None:
    log = Log()
    items = list(range(10))
    # Before the experiment: each user's CTR then predicts their clicks in it (CUPED).
    for u in range(80):
        heavy = u % 2 == 1
        log.answer(f"u{u}", None, items, clicks=items[:3] if heavy else items[:1], ts=NOW - 10**6)
    # Control: 40 users, 10 impressions each, 0 or 2 clicks (CTR 0.1), a conversion every
    # other user; treatment: 40 users, 2 or 4 clicks (CTR 0.3), one conversion each.
    for u in range(40):
        log.expose(f"u{u}", "control")
        heavy = u % 2 == 1
        log.answer(
            f"u{u}",
            "control",
            items,
            clicks=items[:2] if heavy else [],
            conversions=items[:1] if heavy else [],
        )
    for u in range(40, 80):
        log.expose(f"u{u}", "treat")
        heavy = u % 2 == 1
        log.answer(
            f"u{u}", "treat", items, clicks=items[:4] if heavy else items[:2], conversions=[3]
        )
    log.outcome("click", "u1", "no-such-request", 5)  # names no impression
    await log.write(redis_url)

    reply = await report(experiment, log.tenant)
    variants = by_key(reply)
    control, treat = variants["control"], variants["treat"]
    assert [v.variant_key for v in reply.variants] == ["control", "treat"]
    counts = [
        (v.users, v.exposures, v.requests, v.impressions, v.clicks, v.conversions)
        for v in (control, treat)
    ]
    assert counts == [(40, 40, 40, 400, 40, 20), (40, 40, 40, 400, 120, 40)]
    assert control.ctr == pytest.approx(0.1) and treat.ctr == pytest.approx(0.3)
    assert control.conversion_rate == pytest.approx(0.05)
    assert treat.conversion_rate == pytest.approx(0.1)
    assert control.comparisons == []
    ctr = next(c for c in treat.comparisons if c.metric == "ctr")
    assert not ctr.not_computed
    assert ctr.lift.absolute_lift == pytest.approx(0.2)
    assert ctr.lift.relative_lift == pytest.approx(2.0)
    assert 0.0 < ctr.lift.absolute_ci.low < 0.2 < ctr.lift.absolute_ci.high
    assert ctr.lift.p_value < 1e-6 and ctr.lift.probability_to_beat > 0.999
    assert ctr.lift.expected_loss < 1e-6
    # The pre-experiment CTR explains the users' spread within each arm: CUPED narrows it.
    assert reply.covariate_users == 80
    assert ctr.HasField("cuped") and ctr.cuped.variance_reduction > 0.5
    cuped_width = ctr.cuped.absolute_ci.high - ctr.cuped.absolute_ci.low
    assert cuped_width < ctr.lift.absolute_ci.high - ctr.lift.absolute_ci.low
    assert ctr.cuped.absolute_ci.low > 0.0
    conversion = next(c for c in treat.comparisons if c.metric == "conversion_rate")
    assert conversion.lift.absolute_lift == pytest.approx(0.05)
    assert reply.data_quality.unmatched_outcomes == 1
    assert reply.data_quality.users_in_several_variants == 0
    assert [(b.book_version, b.exposures) for b in reply.data_quality.book_versions] == [
        ("book1", 80)
    ]
    assert not reply.srm.mismatch and reply.srm.p_value == pytest.approx(1.0)
    assert reply.first_exposure_ms > 0 and reply.entries == len(log.events)
    assert control.spread.items_shown == 10 and reply.catalogue_size == 10
    assert control.spread.coverage == pytest.approx(1.0)
    assert control.spread.gini == pytest.approx(0.0)
    assert [(d.variant_key, d.impressions, d.clicks) for d in reply.daily] == [
        ("control", 400, 40),
        ("treat", 400, 120),
    ]


async def test_a_later_report_reads_only_what_was_appended(
    experiment: MeshServer, redis_url: str
) -> None:
    log = Log()
    for u in range(4):
        log.expose(f"u{u}", "control" if u < 2 else "treat")
        log.answer(f"u{u}", "control" if u < 2 else "treat", [1, 2], clicks=[1])
    await log.write(redis_url)
    first = await report(experiment, log.tenant)
    assert first.rebuilt and first.entries_read == len(log.events)

    more = Log()
    more.tenant = log.tenant
    more.expose("u9", "treat")
    more.answer("u9", "treat", [3, 4], clicks=[3, 4])
    await more.write(redis_url)
    second = await report(experiment, log.tenant)
    assert not second.rebuilt and second.entries_read == len(more.events)
    assert by_key(second)["treat"].users == 3 and by_key(second)["treat"].clicks == 4

    # An erasure (an audit record) makes the next report read the log again.
    client = mesh_redis.client(redis_url)
    await client.xadd(keys.audit(log.tenant), {"action": "erase"})
    await client.aclose()
    third = await report(experiment, log.tenant)
    assert third.rebuilt and third.entries_read == len(log.events) + len(more.events)


@pytest.mark.parametrize(("control", "treat", "flagged"), [(600, 400, True), (500, 500, False)])
async def test_srm_is_flagged_for_a_60_40_split_of_a_50_50_experiment(
    experiment: MeshServer, redis_url: str, control: int, treat: int, flagged: bool
) -> None:
    log = Log()
    for u in range(control + treat):
        log.expose(f"u{u}", "control" if u < control else "treat")
    await log.write(redis_url)
    reply = await report(experiment, log.tenant)
    assert list(reply.srm.observed) == [control, treat]
    assert list(reply.srm.expected_share) == [0.5, 0.5]
    assert reply.srm.mismatch is flagged
    assert (reply.srm.p_value < 0.001) is flagged
    assert reply.srm.chi2 == pytest.approx(2 * (control - 500) ** 2 / 500)
    # No impressions: nothing to compare, and the report says why.
    assert by_key(reply)["treat"].comparisons[0].not_computed


async def test_guardrails_pass_and_fail_per_variant(experiment: MeshServer, redis_url: str) -> None:
    log = Log()
    for u in range(20):
        log.expose(f"c{u}", "control")
        log.answer(f"c{u}", "control", [1, 2, 3])
        log.expose(f"t{u}", "treat")
        # 2 of 20 treatment answers fell back (10 % > 5 %), one took 500 ms.
        log.answer(
            f"t{u}",
            "treat",
            [1, 2, 3],
            degraded=["ranking"] if u < 2 else [],
            latency_ms=500.0 if u == 5 else 10.0,
        )
    log.error("t7", "treat")
    # The gateway's control fallback (experiment service down) is no bucketing: left out.
    log.answer("c3", "control", [4, 5], degraded=["experiment"])
    await log.write(redis_url)

    reply = await report(experiment, log.tenant)
    guards = {
        key: {g.name: (round(g.value, 6), g.requests, g.passed) for g in v.guardrails}
        for key, v in by_key(reply).items()
    }
    assert guards["control"] == {
        "degraded_share": (0.0, 20, True),
        "p99_latency_ms": (10.0, 20, True),
        "error_rate": (0.0, 20, True),
    }
    treat = guards["treat"]
    assert treat["degraded_share"] == (0.1, 20, False)
    assert treat["p99_latency_ms"][2] is False and treat["p99_latency_ms"][0] > 120
    assert treat["error_rate"] == (round(1 / 21, 6), 21, False)
    assert by_key(reply)["treat"].errors == 1
    assert reply.data_quality.fallback_requests == 1
    assert by_key(reply)["control"].impressions == 60


async def test_a_user_exposed_to_two_variants_is_reported_not_counted(
    experiment: MeshServer, redis_url: str
) -> None:
    log = Log()
    for u in range(3):
        log.expose(f"c{u}", "control")
        log.answer(f"c{u}", "control", [1, 2])
        log.expose(f"t{u}", "treat")
        log.answer(f"t{u}", "treat", [1, 2])
    # After a book change "moved" moved from control to treat.
    log.expose("moved", "control", version="book1")
    log.answer("moved", "control", [1, 2], clicks=[1])
    log.expose("moved", "treat", version="book2", ts=NOW + 86_400_000)
    log.answer("moved", "treat", [1, 2], clicks=[1], ts=NOW + 86_400_000)
    log.expose("renamed", "gone")
    await log.write(redis_url)

    reply = await report(experiment, log.tenant)
    quality = reply.data_quality
    assert quality.users_in_several_variants == 1
    assert quality.impressions_outside_exposure == 4
    assert quality.exposures_of_unknown_variants == 1
    assert {(b.book_version, b.exposures) for b in quality.book_versions} == {
        ("book1", 8),
        ("book2", 1),
    }
    assert [(v.users, v.exposures, v.impressions, v.clicks) for v in reply.variants] == [
        (3, 3, 6, 0),
        (3, 3, 6, 0),
    ]
    assert list(reply.srm.observed) == [3, 3]


async def test_an_experiment_the_book_does_not_declare_for_the_tenant_is_not_found(
    experiment: MeshServer,
) -> None:
    for tenant, key in (("demo", "acme-only"), ("demo", "nope")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await report(experiment, tenant, key)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    reply = await report(experiment, "acme", "acme-only")
    assert [v.variant_key for v in reply.variants] == ["control", "b"]


async def test_an_interleaving_experiment_has_no_report_by_variant(experiment: MeshServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await report(experiment, "demo", "rankers")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interleaving" in (raised.value.details() or "")


async def test_without_redis_a_report_is_refused_and_assignment_works(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(BOOK), encoding="utf-8")
    server = await built_server(build_service, ExperimentSettings(port=0, experiments=path))
    async with serving(server), channel_to(server) as channel:
        stub = experiment_pb2_grpc.ExperimentServiceStub(channel)
        assigned = await stub.Assign(
            experiment_pb2.AssignRequest(user_id="u1"), metadata=tenant_metadata("demo")
        )
        assert assigned.assignments
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetReport(
                experiment_pb2.GetReportRequest(experiment_key="exp"),
                metadata=tenant_metadata("demo"),
            )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_huge_item_id_does_not_join_a_click_to_another_request(
    experiment: MeshServer, redis_url: str
) -> None:
    """Clicks join impressions by (request, item) whatever the ids: a client may name item
    ids up to 2**63 - 1."""
    log = Log()
    for u in range(8):
        variant = "control" if u < 4 else "treat"
        log.expose(f"u{u}", variant)
        log.answer(f"u{u}", variant, [1, 2], clicks=[1] if u == 0 else [])
    log.answer("u9", None, [2**62 - 1], clicks=[2**62 - 1])  # another request, a huge id
    await log.write(redis_url)
    variants = by_key(await report(experiment, log.tenant))
    assert (variants["control"].clicks, variants["treat"].clicks) == (1, 0)


async def test_identical_reports_share_one_computation_and_too_many_are_refused(
    redis_url: str,
) -> None:
    log = Log()
    for u in range(4):
        log.expose(f"u{u}", "control" if u < 2 else "treat")
        log.answer(f"u{u}", "control" if u < 2 else "treat", [1, 2], clicks=[1])
    await log.write(redis_url)
    spec = ReportSpec("exp", (("control", 0.5), ("treat", 0.5)), (), "book1")
    other = ReportSpec("exp", (("control", 0.5), ("treat", 0.5)), (), "book2")
    reports = Reports(redis_url, max_pending=1)
    try:
        first = asyncio.create_task(reports.report(log.tenant, spec))
        same = asyncio.create_task(reports.report(log.tenant, spec))
        await asyncio.sleep(0)  # both asked; the worker is still starting
        with pytest.raises(ResourceExhausted) as refused:
            await reports.report(log.tenant, other)
        assert refused.value.retry_after_s > 0
        one, two = await asyncio.gather(first, same)
        assert one == two and sum(v.clicks for v in one.variants) == 4
        assert (await reports.report(log.tenant, other)).book_version == "book2"  # free again
    finally:
        await reports.close()
