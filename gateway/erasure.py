"""``DELETE /v1/users/{user_id}`` and ``GatewayService.EraseUser``: erase one user of the
calling tenant (a key with the ``admin`` scope), through the events service's ``EraseUser``.

The events service owns the erasure (``services/events/erasure.py``): it removes the
user's events, dead letters, projections and features, recomputes the counters of the
items they touched and appends an audit record naming who asked; here that is the key,
``api-key:<key id>`` (never the key). The call goes to the events service's stub directly,
outside the downstream's breaker and bulkhead: an erasure scans the tenant's log (seconds),
and its timeouts must not open the breaker that guards impression writes.

The gateway waits at most ``timeout_s`` (``RECMESH_GATEWAY_ERASE_TIMEOUT_S``). The events
service runs an erasure it started to its end even when its caller stops waiting, so past
the timeout the answer is ``pending`` (HTTP 202) rather than an error: the erasure most
likely goes on. Erasing is idempotent, so the caller confirms by asking again, which
erases whatever is left and answers with counts (zeros when the first run finished).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import grpc
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.events import ERASURE_COUNTS as COUNTS
from core.validation import check_user_id
from mesh.client import Downstream, describe_failure
from mesh.errors import InvalidArgument, Unavailable


@dataclass(frozen=True)
class Erasure:
    """What an erasure through the gateway answered.

    Attributes:
        status: ``erased`` (the counts are the erasure's), or ``pending`` (the gateway
            stopped waiting; the counts are zeros and ``audit_position`` is empty).
        subject: the user as the audit record names it (``sha256:<hex of the id>``).
        counts: :data:`COUNTS` by name.
        audit_position: the audit record's position in the tenant's audit stream.
    """

    status: str
    subject: str
    counts: dict[str, int]
    audit_position: str

    def to_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "subject": self.subject,
            **self.counts,
            "audit_position": self.audit_position,
        }


def requested_by(key_id: str) -> str:
    """Who asked, as the audit record keeps it: the key's id, never the key."""
    return f"api-key:{key_id}"


class UserErasure:
    """Erasures of the current tenant's users through ``events`` (the tenant travels in the
    call's metadata, from the request context), waiting at most ``timeout_s`` each."""

    def __init__(
        self, events: Downstream[events_pb2_grpc.EventServiceAsyncStub], timeout_s: float
    ) -> None:
        self._events = events
        self._timeout_s = timeout_s

    async def erase(self, user_id: str, key_id: str) -> Erasure:
        """Erase ``user_id`` of the request's tenant, asked by the key ``key_id``.

        Raises:
            InvalidArgument: ``user_id`` is empty or longer than a user id can be.
            Unavailable: the events service failed or could not be reached.
        """
        check_user_id(user_id)
        subject = "sha256:" + hashlib.sha256(user_id.encode()).hexdigest()
        try:
            reply: events_pb2.EraseUserResponse = await self._events.stub.EraseUser(
                events_pb2.EraseUserRequest(user_id=user_id, requested_by=requested_by(key_id)),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Erasure("pending", subject, dict.fromkeys(COUNTS, 0), "")
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(exc.details() or "invalid", field="user_id") from exc
            raise Unavailable(f"the erasure failed: {describe_failure(exc)}") from exc
        return Erasure(
            "erased",
            reply.subject,
            {name: int(getattr(reply, name)) for name in COUNTS},
            reply.audit_position,
        )
