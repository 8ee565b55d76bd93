"""Quota admission from per-tenant leases, so most requests need no call to the quota service.

A call to the quota service leases a few tokens of the tenant's bucket
(``AcquireRequest.max_cost``), and the tenant's next requests take them here:

* a token of a live lease (younger than ``lease_ttl_s``, counted from when its call was
  sent, so never later than the grant) admits a request without a call;
* a denial is remembered until its ``retry_after_s`` and answers the tenant's requests
  until then without a call (nothing but time refills a bucket, so the quota service
  would deny them too);
* every answer bounds the bucket: it holds at most ``remaining`` units until
  ``next_unit_s`` after the answer, then one more every ``1 / rate`` seconds at most,
  less what this gateway's later calls took or may take (other gateways only take more).
  A request the bound leaves no unit for is denied without a call, so a tenant sending far
  over its rate makes about ``rate`` calls per second, nearly all granted, and its other
  requests are refused locally (:meth:`QuotaLeases.denied`). Like a remembered denial,
  the bound runs from when the answer arrived, so it may hold a unit back for up to one
  round trip after the bucket has it. A call that fails counts as having taken what it
  asked for: while the quota service is down and the gateway fails open, the bound still
  keeps each tenant it has heard of to about its rate;
* otherwise one call per tenant is in flight at a time: requests of the tenant that
  arrive meanwhile await it and take from its grant; those it does not cover call again;
* a request that takes a token from a lease that will run out within ``refresh_ahead_s``
  (by its expiry, or by its tokens at the pace they have been taken) starts the next call
  in the background. Its grant adds to the tokens the lease still has live and starts a new
  ``lease_ttl_s``, so a tenant with steady traffic finds a lease and never awaits a call;
  a refill ahead that fails or is slow costs no request anything until the lease it was
  meant to follow runs out.

A lease asks for the tokens taken from the current lease (scaled to a whole
``lease_ttl_s`` when they were taken in less), plus the requests waiting for it, less the
tokens still live; at least 1, at most ``lease_max`` and at most what the tenant's rate
(as the last reply carried it) refills in ``lease_ttl_s``. A tenant whose rate refills less than two
tokens per lease (known from the first reply on), and every tenant when ``lease_max`` is
1, get one call per request, made concurrently as without leases. A refill belongs to all
its waiters: it runs under the quota stage's cap, not under the deadline of the request
that happened to start it, and its grant serves them even if the loop resumes them after
the lease expired.

Trade-off: a gateway may hold up to ``lease_max`` tokens of a tenant for up to
``lease_ttl_s`` (tokens a refill ahead carries over, up to one lease more, for up to
``lease_ttl_s`` after the refill was sent). Tokens still unused when their lease expires
are lost: the bucket counted them as taken, so the tenant is admitted that many fewer
requests than its limit allows. Each gateway holds at most one lease per tenant, and its
size follows the pace of the previous lease's use, so a tenant with steady traffic loses
little; one whose traffic stops loses what its last lease had left. Denials answered from
memory are not counted in the quota service's ``rejected`` usage.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.client import Downstream
from mesh.context import detached

Source = Literal["call", "lease", "denial"]
"""Where an admission came from: this request awaited a quota call (``call``), took a
leased token (``lease``), or was answered by a remembered denial (``denial``)."""


@dataclass(frozen=True)
class Admission:
    """The quota decision for one request.

    Attributes:
        allowed: the request may be served.
        rate: the tenant's limit in requests per second, as the quota service reported it.
        retry_after_s: when not allowed, seconds until the tenant has a token again; else 0.
        source: where the decision came from (:data:`Source`).
    """

    allowed: bool
    rate: float
    retry_after_s: float
    source: Source


@dataclass
class _Lease:
    """One tenant's tokens and what is known of its bucket (touched only on the event loop).

    ``rate`` is 0 until the first reply; ``used`` counts the tokens taken since the current
    lease's call was sent (its pace, with ``expires_at - lease_ttl_s``), ``waiting`` the
    requests awaiting a call; ``call`` is the call in flight (a refill, ahead or not).
    """

    rate: float = 0.0
    tokens: int = 0
    expires_at: float = 0.0
    used: int = 0
    denied_until: float = 0.0
    waiting: int = 0
    call: asyncio.Task[None] | None = None
    bound_at: float = -math.inf
    """When the last answer arrived (-inf before any): the bound's origin."""
    bound_units: int = 0
    """Whole units that answer left in the bucket (``remaining``)."""
    bound_next_s: float = 0.0
    """Its ``next_unit_s``: seconds until the bucket may hold one unit more."""
    answers: int = 0
    """Answers received: a call counts in ``taken`` and ``claiming`` only when it was sent
    after the last of them arrived (so it reached the bucket after that answer's call)."""
    taken: int = 0
    """Units granted since the last answer to calls sent after it arrived."""
    claiming: int = 0
    """Units the calls in flight sent after the last answer arrived may take."""


class QuotaLeases:
    """Admits requests per tenant from tokens leased from the quota service.

    Args:
        quota: the quota service, behind the gateway's guards.
        lease_max: most tokens one call may lease; 1 (or less) turns leasing off.
        lease_ttl_s: seconds a lease's tokens stay usable.
        refresh_ahead_s: a lease that will run out within this many seconds is refilled in
            the background; 0 turns refilling ahead off.
        cap_s: timeout of each quota call (the quota stage's budget).
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
        *,
        lease_max: int,
        lease_ttl_s: float,
        refresh_ahead_s: float,
        cap_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._quota = quota
        self._lease_max = lease_max
        self._ttl_s = lease_ttl_s
        self._ahead_s = refresh_ahead_s
        self._cap_s = cap_s
        self._clock = clock
        self._leases: dict[str, _Lease] = {}

    async def acquire(self, tenant: str) -> Admission:
        """Admit or deny one request of ``tenant``, calling the quota service only when needed.

        ``tenant`` must be the tenant of the current request context: the call names the
        tenant through the call metadata, as every downstream call does.

        Raises:
            grpc.aio.AioRpcError / DeadlineExceeded / CircuitOpen / BulkheadFull: the quota
                call failed (:data:`mesh.client.CALL_FAILURES`), passed on unchanged; every
                request awaiting that call gets it, and nothing is remembered.
        """
        lease = self._leases.setdefault(tenant, _Lease())
        local = self._take(lease, after_call=False)
        if local is not None:
            if local.allowed:
                self._refresh_ahead(lease)
            return local
        lease.waiting += 1
        try:
            while not self._per_request(lease):
                call = lease.call or self._start_refill(lease)
                # Shielded: a request that gives up does not cancel the others' call.
                await asyncio.shield(call)
                admission = self._take(lease, after_call=True)
                if admission is not None:
                    return admission
        finally:
            lease.waiting -= 1
        reply = await self._call(lease, 1)
        return Admission(reply.allowed, reply.rate, reply.retry_after_s, "call")

    def denied(self, tenant: str) -> Admission | None:
        """``tenant``'s remembered denial while it is in force, else None. Taking nothing
        and calling nothing, it lets the funnel refuse a tenant known to be over its quota
        before any other work (admission, experiment assignment)."""
        lease = self._leases.get(tenant)
        if lease is None:
            return None
        now = self._clock()
        if lease.tokens > 0 and now < lease.expires_at:
            return None
        if now < lease.denied_until:
            return Admission(False, lease.rate, lease.denied_until - now, "denial")
        wait = _no_unit_for(lease, now)
        return None if wait is None else Admission(False, lease.rate, wait, "denial")

    def _take(self, lease: _Lease, *, after_call: bool) -> Admission | None:
        """A remembered denial, or a token of a live lease; ``None`` when a call is needed.

        A request that waited for the call takes from its grant even when the grant's
        lease has expired by the time the request runs again (an overloaded loop): it was
        granted for the requests waiting on it, and asking again would only lease tokens
        that expire unused. Live tokens admit even while a denial is in force: the bucket
        counted them as taken when they were leased (a refill ahead may be denied while
        the lease it was to follow still has some).
        """
        now = self._clock()
        if lease.tokens > 0 and (after_call or now < lease.expires_at):
            lease.tokens -= 1
            lease.used += 1
            return Admission(True, lease.rate, 0.0, "call" if after_call else "lease")
        if now < lease.denied_until:
            source: Source = "call" if after_call else "denial"
            return Admission(False, lease.rate, lease.denied_until - now, source)
        wait = _no_unit_for(lease, now)
        if wait is not None:
            return Admission(False, lease.rate, wait, "call" if after_call else "denial")
        return None

    def _cap(self, lease: _Lease) -> int:
        """Most tokens one call may ask for: 1 until the tenant's rate is known."""
        refilled = math.floor(lease.rate * self._ttl_s)
        return max(1, min(self._lease_max, refilled))

    def _age(self, lease: _Lease, now: float) -> float:
        """Seconds since the current lease's call was sent (the window ``used`` counts)."""
        return now - (lease.expires_at - self._ttl_s)

    def _size(self, lease: _Lease, now: float) -> int:
        """Tokens the next call asks for: those taken from the current lease, scaled to a
        whole ``lease_ttl_s`` when they were taken in less (the lease ran out early, or is
        refilled ahead), plus the requests waiting for the call, less the tokens still
        live; at least 1, at most :meth:`_cap`."""
        age = self._age(lease, now)
        taken = lease.used
        if 0 < age < self._ttl_s:
            taken = math.ceil(lease.used * self._ttl_s / age)
        live = lease.tokens if now < lease.expires_at else 0
        return max(1, min(self._cap(lease), taken + lease.waiting - live))

    def _refresh_ahead(self, lease: _Lease) -> None:
        """Start the next call in the background if the live lease will run out within
        ``refresh_ahead_s``: by its expiry, or by its tokens at the pace they have been
        taken (``used`` since the lease's call was sent). Not while a denial is in force:
        the service would deny it too."""
        if self._ahead_s <= 0 or lease.call is not None or self._per_request(lease):
            return
        now = self._clock()
        if now < lease.denied_until:
            return
        age = self._age(lease, now)
        expiring = lease.expires_at - now <= self._ahead_s
        if expiring or lease.tokens * age <= lease.used * self._ahead_s:
            self._start_refill(lease)

    def _start_refill(self, lease: _Lease) -> asyncio.Task[None]:
        """The tenant's call, started. It belongs to every request that awaits it, not to
        the one that starts it: it runs under the quota stage's cap alone, not under that
        request's deadline."""
        lease.call = asyncio.create_task(self._refill(lease), context=detached())
        lease.call.add_done_callback(_retrieve_exception)
        return lease.call

    def _per_request(self, lease: _Lease) -> bool:
        """Leasing is off, or the tenant's known rate allows one token per lease."""
        return self._lease_max <= 1 or (lease.rate > 0 and self._cap(lease) == 1)

    async def _call(self, lease: _Lease, size: int) -> quota_pb2.AcquireResponse:
        """Acquire 1 to ``size`` tokens; remember the tenant's rate and any denial, and
        keep the bound on the bucket (``_Lease.bound_at`` and the fields after it) up to
        date."""
        quota = self._quota
        answers = lease.answers
        lease.claiming += size
        try:
            reply: quota_pb2.AcquireResponse = await quota.call(
                quota.stub.Acquire,
                quota_pb2.AcquireRequest(cost=1, max_cost=size),
                cap_s=self._cap_s,
            )
        except BaseException:
            if lease.answers == answers:
                # Counted as taken: a gateway that fails open serves the request anyway, so
                # the bound keeps the tenant to about its rate while calls fail.
                lease.claiming -= size
                lease.taken += size
            raise
        if lease.answers == answers:
            lease.claiming -= size
        now = self._clock()
        lease.rate = reply.rate
        if not reply.allowed:
            lease.denied_until = now + reply.retry_after_s
        # The newest answer bounds the bucket from now on; calls still in flight were sent
        # before it arrived and are not subtracted (the bound only gets looser).
        lease.answers += 1
        lease.bound_at, lease.bound_units = now, max(0, reply.remaining)
        lease.bound_next_s = max(0.0, reply.next_unit_s)
        lease.taken = lease.claiming = 0
        return reply

    async def _refill(self, lease: _Lease) -> None:
        """Follow the tenant's lease by a new grant (or a denial): its tokens join those
        the lease still has live, and the lease expires ``lease_ttl_s`` after the call was
        sent; a denial leaves the live tokens as they are."""
        try:
            sent = self._clock()
            size = self._size(lease, sent)
            used = lease.used
            reply = await self._call(lease, size)
            live = lease.tokens if self._clock() < lease.expires_at else 0
            if reply.allowed:
                # A quota service older than leases takes exactly ``cost``, granted 0.
                lease.tokens = live + max(1, reply.granted)
                lease.expires_at = sent + self._ttl_s
            else:
                lease.tokens = live
            lease.used -= used  # the new lease's pace counts from when its call was sent
        finally:
            lease.call = None


def _no_unit_for(lease: _Lease, now: float) -> float | None:
    """Seconds until the bucket may hold a unit this gateway has neither taken nor claimed,
    by the bound of the tenant's last answer (``_Lease.bound_at`` and the fields after it);
    None when it may hold one now (or no answer bounds it). An upper bound of the bucket,
    so a request it denies the quota service would deny too (other gateways only take
    more)."""
    if lease.rate <= 0 or lease.bound_at == -math.inf:
        return None
    short = lease.taken + lease.claiming + 1 - lease.bound_units  # units beyond the answer's
    if short <= 0:
        return None
    # The bucket holds one unit more at bound_at + next_unit_s, then one every 1 / rate.
    due = lease.bound_at + lease.bound_next_s + (short - 1) / lease.rate
    return due - now if now < due else None


def _retrieve_exception(call: asyncio.Task[None]) -> None:
    """Mark a refill's failure as seen: its waiters may all have given up before it ended."""
    if not call.cancelled():
        call.exception()
