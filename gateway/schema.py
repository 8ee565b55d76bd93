"""JSON request parsing for the HTTP API: strict types, the offending field named."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from recmesh.events.v1 import events_pb2
from recmesh.gateway.v1 import gateway_pb2

from core.catalog import CATALOG_TYPES, check_ref
from core.events import check_fresh, validate_batch
from gateway.catalog import ItemInput
from mesh.errors import InvalidArgument

MAX_CONTEXT_ENTRIES = 64


@dataclass(frozen=True)
class RecommendBody:
    user_id: str
    num_items: int
    context: dict[str, str]
    debug: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``.

    Raises:
        InvalidArgument: not UTF-8 JSON, or not an object (field ``body``).
    """
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}", field="body") from exc
    if not isinstance(document, dict):
        raise InvalidArgument("body must be a JSON object", field="body")
    return document


def _typed(document: dict[str, Any], name: str, kind: type, default: Any, prefix: str = "") -> Any:
    value = document.get(name, default)
    # bool is an int subclass: a JSON true is never a valid count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{prefix}{name} must be a {kind.__name__}", field=f"{prefix}{name}")
    return value


def _number(document: dict[str, Any], name: str, prefix: str) -> float:
    value = document.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{prefix}{name} must be a number", field=f"{prefix}{name}")
    return float(value)


def parse_recommend(raw: bytes) -> RecommendBody:
    """Parse ``POST /v1/recommend``. Ranges are checked by the funnel.

    Raises:
        InvalidArgument: malformed JSON or a field of the wrong type.
    """
    document = parse_json(raw)
    if "user_id" not in document:
        raise InvalidArgument("user_id is required", field="user_id")
    context = _typed(document, "context", dict, {})
    if len(context) > MAX_CONTEXT_ENTRIES or not all(
        isinstance(v, str | int | float) for v in context.values()
    ):
        raise InvalidArgument(
            f"context must map at most {MAX_CONTEXT_ENTRIES} keys to strings or numbers",
            field="context",
        )
    return RecommendBody(
        user_id=_typed(document, "user_id", str, None),
        num_items=_typed(document, "num_items", int, 10),
        context={str(k): str(v) for k, v in context.items()},
        debug=_typed(document, "debug", bool, False),
    )


def parse_events(raw: bytes) -> list[gateway_pb2.ClientEvent]:
    """Parse ``POST /v1/events`` into the gRPC API's client events (checked later, as a
    batch, by :func:`client_events`).

    ``ts`` is milliseconds since the Unix epoch; ``item_id`` the tenant's own id (a string).

    Raises:
        InvalidArgument: malformed JSON or a field of the wrong type, named as
            ``events[i].field``.
    """
    document = parse_json(raw)
    items = _typed(document, "events", list, None)
    events = []
    for index, entry in enumerate(items):
        prefix = f"events[{index}]."
        if not isinstance(entry, dict):
            raise InvalidArgument("each event must be an object", field=f"events[{index}]")
        attributes = _typed(entry, "attributes", dict, {}, prefix)
        events.append(
            gateway_pb2.ClientEvent(
                event_id=_typed(entry, "event_id", str, "", prefix),
                type=_typed(entry, "type", str, "", prefix),
                user_id=_typed(entry, "user_id", str, "", prefix),
                item_id=_typed(entry, "item_id", str, "", prefix),
                request_id=_typed(entry, "request_id", str, "", prefix),
                ts_ms=_typed(entry, "ts", int, 0, prefix),
                position=_typed(entry, "position", int, 0, prefix),
                propensity=_number(entry, "propensity", prefix),
                attributes={str(k): str(v) for k, v in attributes.items()},
            )
        )
    return events


def client_events(batch: list[gateway_pb2.ClientEvent]) -> list[events_pb2.Event]:
    """A client's batch as log events, checked (both APIs): the item named by the tenant's
    own id (``item_ref``; the log maps it to its internal id).

    Raises:
        InvalidArgument: the first invalid event, named ``events[i].<field>``: a catalog
            type (those come from ``PUT /v1/items``), a bad item id, or what
            :func:`core.events.validate_batch` and :func:`core.events.check_fresh` refuse.
    """
    events = []
    for index, client in enumerate(batch):
        if client.type in CATALOG_TYPES:
            raise InvalidArgument(
                "catalog changes go to PUT /v1/items and DELETE /v1/items/{id}",
                field=f"events[{index}].type",
            )
        if client.item_id:
            check_ref(client.item_id, f"events[{index}].item_id")
        events.append(
            events_pb2.Event(
                event_id=client.event_id,
                type=client.type,
                user_id=client.user_id,
                item_ref=client.item_id,
                request_id=client.request_id,
                ts_ms=client.ts_ms,
                position=client.position,
                propensity=client.propensity,
                attributes=client.attributes,
            )
        )
    validate_batch(events)
    check_fresh(events)
    return events


def parse_items(raw: bytes) -> list[ItemInput]:
    """Parse ``PUT /v1/items``: ``{"items": [{"item_id", "category", "features",
    "attributes", "available"}]}`` (ranges are checked by ``gateway.catalog``).

    Raises:
        InvalidArgument: malformed JSON, an unknown field, or a field of the wrong type,
            named as ``items[i].field``.
    """
    document = parse_json(raw)
    entries = _typed(document, "items", list, None)
    items = []
    for index, entry in enumerate(entries):
        prefix = f"items[{index}]."
        if not isinstance(entry, dict):
            raise InvalidArgument("each item must be an object", field=f"items[{index}]")
        unknown = sorted(set(entry) - ITEM_FIELDS)
        if unknown:
            raise InvalidArgument(
                f"unknown field {unknown[0]!r}; an item has {sorted(ITEM_FIELDS)}",
                field=f"{prefix}{unknown[0]}",
            )
        features = _typed(entry, "features", list, None, prefix)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in features):
            raise InvalidArgument(
                f"{prefix}features must be a list of numbers", field=f"{prefix}features"
            )
        attributes = _typed(entry, "attributes", dict, {}, prefix)
        if not all(isinstance(v, str) for v in attributes.values()):
            raise InvalidArgument(
                f"{prefix}attributes must map names to strings", field=f"{prefix}attributes"
            )
        try:
            values = [float(v) for v in features]
        except OverflowError as exc:
            raise InvalidArgument(
                f"{prefix}features holds a number too large", field=f"{prefix}features"
            ) from exc
        items.append(
            ItemInput(
                ref=_typed(entry, "item_id", str, None, prefix),
                category=_typed(entry, "category", int, 0, prefix),
                features=values,
                attributes=attributes,
                available=_typed(entry, "available", bool, True, prefix),
            )
        )
    return items


ITEM_FIELDS = frozenset({"item_id", "category", "features", "attributes", "available"})
