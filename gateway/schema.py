"""JSON request parsing for the HTTP API: strict types, the offending field named."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from recmesh.events.v1 import events_pb2

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


def parse_events(raw: bytes) -> list[events_pb2.Event]:
    """Parse ``POST /v1/events`` into protobuf events (validated later, as a batch).

    ``ts`` is milliseconds since the Unix epoch; ``item_id`` an integer.

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
            events_pb2.Event(
                event_id=_typed(entry, "event_id", str, "", prefix),
                type=_typed(entry, "type", str, "", prefix),
                user_id=_typed(entry, "user_id", str, "", prefix),
                item_id=_typed(entry, "item_id", int, 0, prefix),
                request_id=_typed(entry, "request_id", str, "", prefix),
                ts_ms=_typed(entry, "ts", int, 0, prefix),
                position=_typed(entry, "position", int, 0, prefix),
                propensity=_number(entry, "propensity", prefix),
                attributes={str(k): str(v) for k, v in attributes.items()},
            )
        )
    return events
