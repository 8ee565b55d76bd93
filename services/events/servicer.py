"""``recmesh.events.v1.EventService``: validated idempotent appends, ordered reads,
erasure of a user."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import Counter
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.events import MAX_REQUEST_ID_BYTES, validate_batch
from core.validation import check_user_id
from mesh.context import current_tenant, request_id_var
from mesh.errors import InvalidArgument
from services.events.erasure import Erased, Eraser, check_request
from services.events.log import EventLog

APPENDS = Counter(
    "recmesh_events_appends_total",
    "Events offered to the log, by tenant and outcome: appended, duplicate (an id already "
    "in the dedupe window: stored once) or refused (the whole batch, with the field that was "
    "invalid: ts for a time too far ahead or too old, type, user_id, ...)",
    ["tenant", "outcome", "field"],
)


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """Appends to and reads from the caller's tenant log only."""

    def __init__(self, log: EventLog, max_read: int, *, eraser: Eraser) -> None:
        self._log = log
        self._max_read = max_read
        self._eraser = eraser
        self._erasing: set[asyncio.Task[Erased]] = set()

    async def finish_erasures(self) -> None:
        """Wait for the erasures under way (the drain calls it): one started runs to its
        end, audit record included, even when its caller went away or the process is
        stopping."""
        if self._erasing:
            await asyncio.gather(*self._erasing, return_exceptions=True)

    async def Append(
        self, request: events_pb2.AppendRequest, context: Any
    ) -> events_pb2.AppendResponse:
        events = list(request.events)
        tenant = current_tenant()
        try:
            validate_batch(events)
        except InvalidArgument as exc:
            APPENDS.labels(tenant, "refused", (exc.field or "").rsplit(".", 1)[-1]).inc(len(events))
            raise
        await self._log.resolve_items(tenant, events)
        result = await self._log.append(tenant, events)
        APPENDS.labels(tenant, "appended", "").inc(result.appended)
        APPENDS.labels(tenant, "duplicate", "").inc(result.duplicates)
        return events_pb2.AppendResponse(appended=result.appended, duplicates=result.duplicates)

    async def Read(self, request: events_pb2.ReadRequest, context: Any) -> events_pb2.ReadResponse:
        if not 0 <= request.limit <= self._max_read:
            raise InvalidArgument(f"limit must be in 0..{self._max_read}", field="limit")
        if request.after and not _is_stream_id(request.after):
            raise InvalidArgument(
                "after must be a stream position like 1700000000000-0", field="after"
            )
        entries = await self._log.read(current_tenant(), request.after, request.limit or 100)
        return events_pb2.ReadResponse(
            events=[events_pb2.StoredEvent(position=p, event=e) for p, e in entries]
        )

    async def ReadRequestEvents(
        self, request: events_pb2.ReadRequestEventsRequest, context: Any
    ) -> events_pb2.ReadResponse:
        if not request.request_id:
            raise InvalidArgument("request_id is required", field="request_id")
        if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgument(
                f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes", field="request_id"
            )
        entries = await self._log.read_request(current_tenant(), request.request_id, self._max_read)
        return events_pb2.ReadResponse(
            events=[events_pb2.StoredEvent(position=p, event=e) for p, e in entries]
        )

    async def ReadUserEvents(
        self, request: events_pb2.ReadUserEventsRequest, context: Any
    ) -> events_pb2.ReadUserEventsResponse:
        """A page of the user's events appended at or before ``until_ms`` (0 = now).

        Raises:
            InvalidArgument: no or too long ``user_id``, ``until_ms`` below 0, ``limit``
                outside 0..max_read, or ``after`` not a stream position.
        """
        check_user_id(request.user_id)
        if request.until_ms < 0:
            raise InvalidArgument("until_ms must be >= 0 (0 = now)", field="until_ms")
        if not 0 <= request.limit <= self._max_read:
            raise InvalidArgument(f"limit must be in 0..{self._max_read}", field="limit")
        if request.after and not _is_stream_id(request.after):
            raise InvalidArgument(
                "after must be a stream position like 1700000000000-0", field="after"
            )
        page = await self._log.read_user(
            current_tenant(),
            request.user_id,
            request.until_ms or int(time.time() * 1000),
            request.limit or 100,
            request.after,
        )
        return events_pb2.ReadUserEventsResponse(
            events=[events_pb2.StoredEvent(position=p, event=e) for p, e in page.events],
            next_after=page.next_after,
            horizon_ms=page.horizon_ms,
        )

    async def EraseUser(
        self, request: events_pb2.EraseUserRequest, context: Any
    ) -> events_pb2.EraseUserResponse:
        """Erase a user of the caller's tenant (:mod:`services.events.erasure`). The erasure
        runs to its end even when the caller stops waiting, so a cancelled call does not
        leave it half done; its audit record says it happened.

        Raises:
            InvalidArgument: no or too long ``user_id``, no or too long ``requested_by``.
        """
        check_request(request.user_id, request.requested_by)
        task = asyncio.create_task(
            self._eraser.erase(
                current_tenant(),
                request.user_id,
                request.requested_by,
                peer=str(context.peer() or ""),
                request_id=request_id_var.get(),
            )
        )
        self._erasing.add(task)
        task.add_done_callback(self._erasing.discard)
        erased = await asyncio.shield(task)
        return events_pb2.EraseUserResponse(
            subject=erased.subject,
            events=erased.events,
            dead_letters=erased.dead_letters,
            projections=erased.projections,
            snapshot_entries=erased.snapshot_entries,
            feature_keys=erased.feature_keys,
            items_recomputed=erased.items_recomputed,
            audit_position=erased.audit_position,
        )


def _is_stream_id(value: str) -> bool:
    millis, _, seq = value.partition("-")
    return millis.isdigit() and (seq == "" or seq.isdigit())
