"""What makes an event acceptable; shared by the events service and the gateway."""

from __future__ import annotations

import time

from recmesh.events.v1 import events_pb2

from core.catalog import CATALOG_TYPES, ITEM_UPSERT, MAX_ID_BYTES, check_attributes
from core.validation import check_user_id
from mesh.errors import InvalidArgument

EVENT_TYPES = frozenset(
    {"impression", "click", "conversion", "exposure", "dismiss", "error", *CATALOG_TYPES}
)
"""``exposure`` and ``error`` are the gateway's own, like ``impression``: a user's exposure to
an experiment's variant, and a request of an assigned user the gateway failed
(``gateway.exposures``); experiment reports read them. The catalog's ``item_upsert`` and
``item_delete`` (:mod:`core.catalog`) name no user."""
CLIENT_TYPES = frozenset({"impression", "click", "conversion", "dismiss"})
"""What a client may post to ``/v1/events``; the other types are written by the mesh."""
MAX_EVENT_ID = 128
MAX_REQUEST_ID_BYTES = 128
MAX_BATCH = 1000
MAX_FUTURE_MS = 24 * 3600 * 1000
MAX_AGE_MS = 7 * 24 * 3600 * 1000
"""Oldest event time a client may post (:func:`check_fresh`, at the gateway): the events
service remembers an event id for at least ``MAX_AGE_MS + MAX_FUTURE_MS``
(``RECMESH_EVENTS_DEDUPE_TTL_S``), so a client's retry of an event can never arrive after
its id was forgotten and count twice."""
MAX_SUPPORT = 4096
"""Most items an impression's ``support`` may list (an answer's exploit items plus its
exploration pool: at most ``num_items`` plus ``explore_pool``, 10 + 100 with the ranking
service's defaults)."""


def validate_event(event: events_pb2.Event, index: int, now_ms: int | None = None) -> None:
    """Check one event of a batch; errors name ``events[index].<field>``.

    Raises:
        InvalidArgument: a field is missing or out of range.
    """
    prefix = f"events[{index}]"
    if not 0 < len(event.event_id) <= MAX_EVENT_ID:
        raise InvalidArgument(
            f"event_id must be 1..{MAX_EVENT_ID} characters", field=f"{prefix}.event_id"
        )
    if event.type not in EVENT_TYPES:
        raise InvalidArgument(f"type must be one of {sorted(EVENT_TYPES)}", field=f"{prefix}.type")
    catalog = event.type in CATALOG_TYPES
    if not catalog:
        check_user_id(event.user_id, field=f"{prefix}.user_id")
    if event.item_id < 0:
        raise InvalidArgument("item_id must be >= 0", field=f"{prefix}.item_id")
    if len(event.item_ref.encode()) > MAX_ID_BYTES:
        raise InvalidArgument(
            f"item_id is longer than {MAX_ID_BYTES} bytes", field=f"{prefix}.item_id"
        )
    check_attributes(event.attributes, f"{prefix}.attributes")
    if catalog:
        _validate_catalog(event, prefix)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if len(event.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgument(
            f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes", field=f"{prefix}.request_id"
        )
    if not 0 < event.ts_ms <= now_ms + MAX_FUTURE_MS:
        raise InvalidArgument(
            "ts must be a positive epoch time in milliseconds, not in the far future",
            field=f"{prefix}.ts",
        )
    if not 0.0 <= event.propensity <= 1.0:
        raise InvalidArgument("propensity must be in [0, 1]", field=f"{prefix}.propensity")
    if event.support:
        if event.type != "impression":
            raise InvalidArgument("only an impression has a support", field=f"{prefix}.support")
        if len(event.support) > MAX_SUPPORT or min(event.support) < 0:
            raise InvalidArgument(
                f"support must list at most {MAX_SUPPORT} item ids, each >= 0",
                field=f"{prefix}.support",
            )


def _validate_catalog(event: events_pb2.Event, prefix: str) -> None:
    if not event.item_ref:
        raise InvalidArgument("a catalog event names its item", field=f"{prefix}.item_id")
    if event.type != ITEM_UPSERT:
        return
    if event.category < 0:
        raise InvalidArgument("category must be >= 0", field=f"{prefix}.category")
    if not event.features or len(event.features) % 4:
        raise InvalidArgument("features must be packed float32 values", field=f"{prefix}.features")


def check_fresh(events: list[events_pb2.Event], now_ms: int | None = None) -> None:
    """Refuse a client's batch with an event older than :data:`MAX_AGE_MS`. Checked where
    clients post (the gateway), not on the way to the log: an event the gateway accepted
    is never refused later for having aged in its outbox, and a replay of the log judges
    events by :func:`validate_event` alone.

    Raises:
        InvalidArgument: naming the first event too old.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    for index, event in enumerate(events):
        if event.ts_ms < now_ms - MAX_AGE_MS:
            raise InvalidArgument(
                f"ts is more than {MAX_AGE_MS // 86_400_000} days old: too late to be taken once",
                field=f"events[{index}].ts",
            )


def validate_batch(events: list[events_pb2.Event], now_ms: int | None = None) -> None:
    """Check a whole batch (size, each event) as of ``now_ms`` (default: now).

    Raises:
        InvalidArgument: empty or oversized batch, or an invalid event (named).
    """
    if not events:
        raise InvalidArgument("events must not be empty", field="events")
    if len(events) > MAX_BATCH:
        raise InvalidArgument(f"at most {MAX_BATCH} events per call", field="events")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    for index, event in enumerate(events):
        validate_event(event, index, now_ms)


ERASURE_COUNTS = tuple(
    field.name
    for field in events_pb2.EraseUserResponse.DESCRIPTOR.fields
    if field.type == field.TYPE_INT32
)
"""What an erasure counts (the int fields of ``EraseUserResponse``), in field order: the
gateway's answer and ``recmesh users erase`` list them so."""
