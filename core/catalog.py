"""The live catalog's rules: a tenant's own item ids, their internal ids, catalog events.

**Ids.** Clients name items by their own strings (1..:data:`MAX_ID_BYTES` bytes of UTF-8).
Inside, an item is a dense ``int64``:

* the artifact set's items are ``0 .. n-1``, the rows of its models; their external id is
  their decimal number (``"17"``), the synthetic world's names (:func:`set_item`);
* every other id a tenant uses gets the next id of the tenant's own range,
  ``LIVE_BASE, LIVE_BASE + 1, ...``, the first time the log sees it, and keeps it.

The log assigns them (``services.events``, one Lua call per batch): a stored event carries
both ``item_ref`` (the tenant's) and ``item_id`` (the internal one), so the mapping is
rebuilt by reading the log in order (:func:`replay_ids`).

**Catalog events.** ``item_upsert`` (category, features, attributes, available) and
``item_delete``, written by the gateway's ``PUT /v1/items`` and ``DELETE /v1/items/{id}``
and applied in log order by the projector: for one id, the later event in the log wins.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from recmesh.events.v1 import events_pb2

from mesh.errors import InvalidArgument

MAX_ID_BYTES = 128
"""Longest external id (users and items), in bytes of UTF-8."""
LIVE_BASE = 1 << 40
"""The first internal id of a tenant's own items; below it, the artifact set's items."""
MAX_ITEMS_PER_CALL = 1000
"""Most items one ``PUT /v1/items`` (or ``DELETE``) call may carry."""
MAX_ATTRIBUTES = 64
"""Most attributes one item may carry."""
MAX_ATTRIBUTE_BYTES = 1024
"""Longest attribute key or value, in bytes."""

ITEM_UPSERT = "item_upsert"
ITEM_DELETE = "item_delete"
CATALOG_TYPES = frozenset({ITEM_UPSERT, ITEM_DELETE})


def check_ref(ref: str, field: str) -> str:
    """``ref`` if it is a valid external id (1..128 bytes of UTF-8).

    Raises:
        InvalidArgument: empty or too long, naming ``field``.
    """
    if not ref:
        raise InvalidArgument(f"{field} is required", field=field)
    if len(ref.encode()) > MAX_ID_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_ID_BYTES} bytes", field=field)
    return ref


def set_item(ref: str) -> int | None:
    """The artifact set's item ``ref`` names (its canonical decimal number below
    :data:`LIVE_BASE`: ``"17"``, not ``"017"`` or ``"+17"``), or None for a tenant's own id."""
    if not ref.isascii() or not ref.isdigit() or (len(ref) > 1 and ref[0] == "0"):
        return None
    number = int(ref)
    return number if number < LIVE_BASE else None


def is_live(item_id: int) -> bool:
    """Whether ``item_id`` is one of a tenant's own items (not an artifact set's)."""
    return item_id >= LIVE_BASE


def name_of(item_id: int, names: Mapping[int, str]) -> str:
    """The external id of ``item_id``: its decimal number for a set item, else its entry in
    ``names`` (the decimal number when absent, which only a lost mapping could cause)."""
    return names.get(item_id, str(item_id)) if is_live(item_id) else str(item_id)


def check_features(values: Sequence[float], width: int, field: str) -> bytes:
    """``values`` packed as float32 little-endian, checked to be ``width`` finite numbers.

    Raises:
        InvalidArgument: another length, or a NaN or infinite value (or one float32 cannot
            hold).
    """
    if len(values) != width:
        raise InvalidArgument(f"{field} must hold {width} numbers, got {len(values)}", field=field)
    if not all(math.isfinite(v) for v in values):
        raise InvalidArgument(f"{field} must be finite numbers", field=field)
    with np.errstate(over="ignore"):
        packed = np.asarray(values, dtype="<f4")
    if not np.isfinite(packed).all():
        raise InvalidArgument(f"{field} holds a number too large for float32", field=field)
    return packed.tobytes()


def check_attributes(attributes: Mapping[str, str], field: str) -> None:
    """Raises:
    InvalidArgument: more than :data:`MAX_ATTRIBUTES` entries, or a key or value longer
        than :data:`MAX_ATTRIBUTE_BYTES`."""
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument(f"{field} has more than {MAX_ATTRIBUTES} entries", field=field)
    for key, value in attributes.items():
        if len(key.encode()) > MAX_ATTRIBUTE_BYTES or len(value.encode()) > MAX_ATTRIBUTE_BYTES:
            raise InvalidArgument(
                f"{field} keys and values must be at most {MAX_ATTRIBUTE_BYTES} bytes",
                field=field,
            )


def check_batch_size(count: int, field: str) -> None:
    """Raises:
    InvalidArgument: no items, or more than :data:`MAX_ITEMS_PER_CALL`."""
    if count == 0:
        raise InvalidArgument(f"{field} must not be empty", field=field)
    if count > MAX_ITEMS_PER_CALL:
        raise InvalidArgument(f"at most {MAX_ITEMS_PER_CALL} items per call", field=field)


def upsert_event(
    ref: str,
    category: int,
    features: bytes,
    attributes: Mapping[str, str],
    available: bool,
    ts_ms: int,
) -> events_pb2.Event:
    """The ``item_upsert`` event of one checked item (a fresh event id)."""
    return events_pb2.Event(
        event_id=f"cat-{uuid.uuid4().hex}",
        type=ITEM_UPSERT,
        item_ref=ref,
        category=category,
        features=features,
        attributes=dict(attributes),
        available=available,
        ts_ms=ts_ms,
    )


def delete_event(ref: str, ts_ms: int) -> events_pb2.Event:
    """The ``item_delete`` event of ``ref`` (a fresh event id)."""
    return events_pb2.Event(
        event_id=f"cat-{uuid.uuid4().hex}", type=ITEM_DELETE, item_ref=ref, ts_ms=ts_ms
    )


def replay_ids(events: Iterable[events_pb2.Event]) -> dict[str, int]:
    """The tenant's own ids and their internal ids, as the log's events (read in order)
    record them: what the events service's map must hold."""
    mapping: dict[str, int] = {}
    for event in events:
        if event.item_ref and is_live(event.item_id):
            mapping.setdefault(event.item_ref, event.item_id)
    return mapping
