"""A user's features as of a past time, computed from the event log.

``GetUserFeatures`` with ``as_of_ms`` = T answers what the feature service would have
answered at T had the projector been caught up, and nothing that was not yet in the log
at T leaks in:

* the row and the materialised history are what materialisation wrote (they come from
  the artifact set, which is taken to predate the log);
* the user's clicks and conversions are replayed with the projector's rules
  (:class:`core.replay.Replay`, the same history cap) over the user's events appended to
  the log at or before T, read from the events service (``ReadUserEvents``). The append
  time decides, not the event's ``ts_ms``: an event appended after T is left out even
  when its client dated it before T (it was not in the log at T);
* category shares come from the same replay; an item's category is read from its current
  feature row (the projector read the row when it applied the event; the two differ only
  for an item whose row changed in between).

Where the log no longer holds everything (retention trimmed it, an erasure removed
entries: ``horizon_ms`` of ``ReadUserEvents`` is set), the replay starts from the tenant's
projection snapshot (``keys.snapshot``, which retention takes before it trims) and reads
the user's events after the snapshot's position. A time before the snapshot (or, for a
tenant without one, before the log's horizon) cannot be answered: ``FAILED_PRECONDITION``
naming that time. A log that never lost an entry answers any past time from its start
(and never reads the snapshot, whose whole state is decoded per read).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeAlias

import grpc
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.replay import OUTCOMES, Projected, Replay, appended_ms, category_shares
from mesh.client import Downstream, describe_failure
from mesh.errors import FailedPrecondition, Unavailable
from services.feature.store import FeatureStore
from services.runtime.user_view import UserFeatures

EventsClient: TypeAlias = "Downstream[events_pb2_grpc.EventServiceAsyncStub]"
"""The guarded client of the events service that as-of reads page through."""


class AsOfReader:
    """Computes users' features as of a past time (see the module docstring).

    Args:
        store: the feature store (materialised rows and histories, item categories, the
            projection snapshot).
        events: the events service.
        history_cap: outcomes kept per user, the projector's (``mesh.settings.history_cap``).
        page: events asked for per ``ReadUserEvents`` call.
        budget_s: cap on each call.
    """

    def __init__(
        self,
        store: FeatureStore,
        events: EventsClient,
        history_cap: int,
        page: int,
        budget_s: float,
    ) -> None:
        self._store = store
        self._events = events
        self._history_cap = history_cap
        self._page = page
        self._budget_s = budget_s

    async def user(
        self, tenant: str, user_id: str, history_limit: int, as_of_ms: int
    ) -> UserFeatures:
        """``user_id``'s row, last ``history_limit`` history entries and category shares as
        of ``as_of_ms`` (not in the future: the caller checks).

        Raises:
            FailedPrecondition: ``as_of_ms`` is before the log's horizon, or nothing is
                materialised for ``tenant``.
            Unavailable: the events service could not be read.
        """
        base = await self._store.get_materialised(tenant, user_id, history_limit)
        page = await self._read(user_id, as_of_ms, "")
        start: Projected | None = None
        if page.horizon_ms:
            snapshot = await self._store.user_snapshot(tenant, user_id)
            taken = appended_ms(snapshot.position) if snapshot and snapshot.position else None
            if snapshot is not None and taken is not None and as_of_ms >= taken:
                start = snapshot
                page = await self._read(user_id, as_of_ms, snapshot.position)
            else:
                # With a snapshot, what came before it may have been trimmed: only times
                # from the snapshot on can be answered. Without one, entries were removed by
                # erasure (retention snapshots before it trims): the log answers from its
                # horizon on.
                horizon = taken if taken is not None else page.horizon_ms
                if as_of_ms < horizon:
                    raise FailedPrecondition(
                        f"as_of_ms {as_of_ms} ({_iso(as_of_ms)}) is before the horizon of "
                        f"tenant {tenant!r}'s event log, {horizon} ({_iso(horizon)}): the log "
                        "no longer holds what came before it",
                        field="as_of_ms",
                    )
        categories: dict[int, int] = {}
        asked: set[int] = set()
        replay = Replay(None, self._history_cap, categories, start)
        while True:
            new = {s.event.item_id for s in page.events if s.event.type in OUTCOMES} - asked
            if new:
                wanted = sorted(new)
                items = await self._store.get_items(tenant, wanted)
                categories.update(
                    (item, int(category))
                    for item, category, missing in zip(
                        wanted, items.categories, items.missing, strict=True
                    )
                    if not missing
                )
                asked |= new
            for stored in page.events:
                replay.apply(stored.position, stored.event)
            if not page.next_after:
                break
            page = await self._read(user_id, as_of_ms, page.next_after)
        outcomes = replay.state.outcomes.get(user_id, [])
        return UserFeatures(
            base.features,
            (base.history + outcomes)[-history_limit:],
            base.is_default,
            category_shares(replay.state.shares.get(user_id, {})),
        )

    async def _read(
        self, user_id: str, until_ms: int, after: str
    ) -> events_pb2.ReadUserEventsResponse:
        try:
            return await self._events.call(
                self._events.stub.ReadUserEvents,
                events_pb2.ReadUserEventsRequest(
                    user_id=user_id, until_ms=until_ms, limit=self._page, after=after
                ),
                cap_s=self._budget_s,
                idempotent=True,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                raise Unavailable(
                    f"the user's events could not be read from the events service: "
                    f"{describe_failure(exc)}"
                ) from exc
            # The service answered and refused this read (a page larger than its
            # RECMESH_EVENTS_MAX_READ): a deployment error, not an outage to retry.
            raise FailedPrecondition(
                f"the events service refused the read of the user's events: {describe_failure(exc)}"
            ) from exc


_UNREACHABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
"""Statuses of a read that did not get an answer, worth retrying later: UNAVAILABLE here."""


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
