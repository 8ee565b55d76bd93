"""``recmesh.events.v1.EventService``: validated idempotent appends, ordered reads."""

from __future__ import annotations

from typing import Any

from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.events import MAX_REQUEST_ID_BYTES, validate_batch
from mesh.context import current_tenant
from mesh.errors import InvalidArgument
from services.events.log import EventLog


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """Appends to and reads from the caller's tenant log only."""

    def __init__(self, log: EventLog, max_read: int) -> None:
        self._log = log
        self._max_read = max_read

    async def Append(
        self, request: events_pb2.AppendRequest, context: Any
    ) -> events_pb2.AppendResponse:
        events = list(request.events)
        validate_batch(events)
        result = await self._log.append(current_tenant(), events)
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


def _is_stream_id(value: str) -> bool:
    millis, _, seq = value.partition("-")
    return millis.isdigit() and (seq == "" or seq.isdigit())
