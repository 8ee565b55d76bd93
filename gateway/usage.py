"""What each tenant's recommendations cost, carried to its usage in the quota service.

Retrieval and ranking say in every answer what the call cost them (``Cost``: CPU
microseconds, and for ranking the candidates each stage scored; ``mesh.cpu``). The funnel
adds the costs of each answered recommendation to its tenant's sums here, in memory: a few
dictionary updates, no call. Every ``flush_s`` one ``RecordUsage`` call carries every
tenant's sums to the quota service, which adds them to the tenant's hourly usage in Redis
(``GetUsage``, ``recmesh usage``). So the request path pays nothing per request but the
sums, and the quota service one call per gateway per ``flush_s``.

* **Once, whatever the retries.** Sums leave in a batch with an id. A batch whose call
  failed is sent again, unchanged and under the same id, at the next flush (the quota
  service adds each tenant's part of a batch once); costs arriving meanwhile fill the next
  batch. At most two batches are held: the one being sent and the one filling.
* **What a restart loses.** Costs not yet sent: at most the last ``flush_s`` of answers
  when the process is killed (plus the batch waiting to be sent again while the quota
  service is unreachable). A clean stop flushes once more. What was sent is in Redis and
  survives any restart of the gateway or the quota service.
* **What is not counted.** An answer that never reached the gateway (a call cancelled at
  the request's deadline, a failed call) carries no cost; the services' own
  ``recmesh_tenant_cpu_seconds_total`` counts that CPU too. The popular fallback's
  background refreshes are the gateway's own, not a tenant's request.
* **Its own guard.** The calls go over the quota channel but through a guard of their own
  (``quota_usage`` in the downstream metrics): a failing flush never opens the breaker
  that the quota admissions go through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter
from recmesh.common.v1 import common_pb2
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.client import CALL_FAILURES, CallPolicy, Downstream, describe_failure

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 1.0
"""How long one RecordUsage call may take."""

FLUSHES = Counter(
    "recmesh_gateway_usage_flushes_total",
    "RecordUsage calls carrying the tenants' costs to the quota service, by outcome",
    ["outcome"],
)


@dataclass
class _Sums:
    """One tenant's costs since the last batch left."""

    requests: int = 0
    cpu_us: Tally[str] = field(default_factory=Tally)
    scored: Tally[str] = field(default_factory=Tally)


class UsageLedger:
    """Per-tenant sums of the costs answers reported, flushed to the quota service.

    Args:
        quota: the gateway's quota downstream; its stub is called through a guard of the
            ledger's own.
        flush_s: seconds between flushes; 0 or less turns the ledger off (nothing summed,
            nothing sent).
        new_id: makes a batch id (tests pass their own).
    """

    def __init__(
        self,
        quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
        *,
        flush_s: float,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._quota = Downstream("quota_usage", quota.stub, policy=CallPolicy(max_attempts=1))
        self._flush_s = flush_s
        self._new_id = new_id
        self._filling: dict[str, _Sums] = {}
        self._sending: quota_pb2.RecordUsageRequest | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._flush_s > 0

    def add(self, tenant: str, costs: Mapping[str, common_pb2.Cost]) -> None:
        """Add one recommendation's costs (service name -> its answer's ``cost``; costs an
        answer did not carry are left out) to ``tenant``'s sums."""
        if not self.enabled:
            return
        carried = [(service, cost) for service, cost in costs.items() if cost.ByteSize()]
        if not carried:
            return
        sums = self._filling.get(tenant)
        if sums is None:
            sums = self._filling[tenant] = _Sums()
        sums.requests += 1
        for service, cost in carried:
            sums.cpu_us[service] += cost.cpu_us
            sums.scored.update(cost.candidates_scored)

    def held(self, tenant: str) -> int:
        """Requests of ``tenant`` whose costs are held, not yet sent."""
        filling = self._filling.get(tenant)
        sending = 0
        if self._sending is not None:
            sending = sum(c.requests for c in self._sending.costs if c.tenant == tenant)
        return (filling.requests if filling is not None else 0) + sending

    async def flush(self) -> bool:
        """Send the batch waiting to be sent again, then the one filling; whether
        everything held was sent (False: the rest waits for the next flush)."""
        for _ in range(2):
            if self._sending is None:
                if not self._filling:
                    return True
                self._sending = self._batch()
            try:
                await self._quota.call(
                    self._quota.stub.RecordUsage, self._sending, cap_s=FLUSH_TIMEOUT_S
                )
            except CALL_FAILURES as exc:
                FLUSHES.labels("failed").inc()
                log.warning("usage not recorded, sent again later: %s", describe_failure(exc))
                return False
            FLUSHES.labels("ok").inc()
            self._sending = None
        return not self._filling

    def _batch(self) -> quota_pb2.RecordUsageRequest:
        filling, self._filling = self._filling, {}
        return quota_pb2.RecordUsageRequest(
            batch_id=self._new_id(),
            costs=[
                quota_pb2.TenantCost(
                    tenant=tenant,
                    requests=sums.requests,
                    cpu_us=dict(sums.cpu_us),
                    candidates_scored=dict(sums.scored),
                )
                for tenant, sums in filling.items()
            ],
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def start(self) -> None:
        """Flush every ``flush_s`` from now on (a start-up hook)."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop flushing, then flush what is held once more (a clean-up hook, before the
        quota channel closes)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.enabled:
            await self.flush()
