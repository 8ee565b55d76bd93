"""The gateway's per-tenant cost sums and their flushes to the quota service (gateway.usage),
against a stub quota service that can fail."""

from __future__ import annotations

import itertools
from typing import Any

import grpc
from recmesh.common.v1 import common_pb2
from recmesh.quota.v1 import quota_pb2

from gateway.usage import UsageLedger
from mesh.client import Downstream


class StubQuota:
    """Records every RecordUsage it is sent; fails while ``failing``."""

    def __init__(self) -> None:
        self.sent: list[quota_pb2.RecordUsageRequest] = []
        self.failing = False

    async def RecordUsage(
        self,
        request: quota_pb2.RecordUsageRequest,
        timeout: float | None = None,  # noqa: ASYNC109 (a stub's signature, as gRPC's)
    ) -> quota_pb2.RecordUsageResponse:
        self.sent.append(request)
        if self.failing:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
            )
        return quota_pb2.RecordUsageResponse(added=len(request.costs))


def ledger(stub: StubQuota, flush_s: float = 1.0) -> UsageLedger:
    ids = (f"batch-{n}" for n in itertools.count(1))
    quota: Downstream[Any] = Downstream("quota", stub)
    return UsageLedger(quota, flush_s=flush_s, new_id=lambda: next(ids))


def answer(cpu_us: int, **scored: int) -> common_pb2.Cost:
    return common_pb2.Cost(cpu_us=cpu_us, candidates_scored=scored)


def by_tenant(request: quota_pb2.RecordUsageRequest) -> dict[str, quota_pb2.TenantCost]:
    return {cost.tenant: cost for cost in request.costs}


async def test_answers_are_summed_per_tenant_and_sent_in_one_call() -> None:
    stub = StubQuota()
    usage = ledger(stub)
    usage.add("demo", {"retrieval": answer(300), "ranking": answer(900, prerank=50, heavy=20)})
    usage.add("demo", {"retrieval": answer(200), "ranking": answer(700, prerank=40, heavy=20)})
    usage.add("acme", {"retrieval": answer(100), "ranking": common_pb2.Cost()})  # no ranking
    usage.add("acme", {"retrieval": common_pb2.Cost()})  # a fallback answer: nothing carried
    assert usage.held("demo") == 2 and usage.held("acme") == 1
    assert await usage.flush()
    assert len(stub.sent) == 1
    sent = by_tenant(stub.sent[0])
    assert sent["demo"].requests == 2
    assert dict(sent["demo"].cpu_us) == {"retrieval": 500, "ranking": 1600}
    assert dict(sent["demo"].candidates_scored) == {"prerank": 90, "heavy": 40}
    assert sent["acme"].requests == 1 and dict(sent["acme"].cpu_us) == {"retrieval": 100}
    assert usage.held("demo") == 0
    assert await usage.flush() and len(stub.sent) == 1  # nothing held: no call


async def test_a_failed_batch_is_sent_again_unchanged_and_new_costs_follow_it() -> None:
    stub = StubQuota()
    usage = ledger(stub)
    usage.add("demo", {"retrieval": answer(100)})
    stub.failing = True
    assert not await usage.flush()
    usage.add("demo", {"retrieval": answer(40)})  # arrives while the first batch waits
    assert usage.held("demo") == 2
    assert not await usage.flush()  # still down: the same batch again
    stub.failing = False
    assert await usage.flush()
    ids = [request.batch_id for request in stub.sent]
    assert ids == ["batch-1", "batch-1", "batch-1", "batch-2"]
    assert stub.sent[0] == stub.sent[1] == stub.sent[2]  # same id, same content
    assert by_tenant(stub.sent[2])["demo"].cpu_us["retrieval"] == 100
    assert by_tenant(stub.sent[3])["demo"].cpu_us["retrieval"] == 40
    assert usage.held("demo") == 0


async def test_stop_flushes_what_is_held_and_a_zero_interval_turns_it_off() -> None:
    stub = StubQuota()
    usage = ledger(stub, flush_s=60.0)
    await usage.start()
    usage.add("demo", {"ranking": answer(10, rerank=5)})
    await usage.stop()
    assert [by_tenant(r)["demo"].requests for r in stub.sent] == [1]

    off = ledger(stub, flush_s=0.0)
    await off.start()
    off.add("demo", {"ranking": answer(10)})
    await off.stop()
    assert off.held("demo") == 0 and len(stub.sent) == 1
