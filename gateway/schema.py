"""The HTTP API's JSON bodies, each declared once (:mod:`gateway.jsonmodel`): the server
checks requests with these models, and the OpenAPI document (:mod:`gateway.openapi`) is
emitted from the same models, so the schema and the server cannot differ.

Limits come from where the rest of the mesh keeps them (``core.catalog``, ``core.events``,
the gateway's settings); bounds known only at run time are :func:`request_params`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import grpc
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2
from recmesh.experiment.v1 import experiment_pb2
from recmesh.gateway.v1 import gateway_pb2

from core.catalog import (
    CATALOG_TYPES,
    MAX_ATTRIBUTE_BYTES,
    MAX_ATTRIBUTES,
    MAX_ID_BYTES,
    MAX_ITEMS_PER_CALL,
    check_ref,
)
from core.events import (
    CLIENT_TYPES,
    ERASURE_COUNTS,
    EVENT_TYPES,
    MAX_AGE_MS,
    MAX_BATCH,
    MAX_EVENT_ID,
    MAX_FUTURE_MS,
    MAX_REQUEST_ID_BYTES,
    check_fresh,
    validate_batch,
)
from gateway.catalog import ItemInput
from gateway.jsonmodel import (
    FLOAT32_MAX,
    INT32,
    INT64,
    Arr,
    Bool,
    Int,
    Map,
    Model,
    Num,
    Obj,
    Param,
    Params,
    Prop,
    Scalar,
    Str,
    proto_json,
)
from mesh.errors import InvalidArgument

MAX_CONTEXT_ENTRIES = 64
DEFAULT_NUM_ITEMS = 10

# Run-time bounds (request_params): the settings' largest num_items, the window of event
# times the gateway accepts now, the item feature width the tenants share (when known).
MAX_ITEMS = Param("max_items")
OLDEST_TS = Param("oldest_ts", 1)
NEWEST_TS = Param("newest_ts", INT64[1])
ITEM_WIDTH = Param("item_width")


def request_params(max_items: int, now_ms: int, item_width: int | None = None) -> dict[str, int]:
    """The run-time bounds of the request models: ``num_items`` up to ``max_items``; event
    times ``ts`` from :data:`core.events.MAX_AGE_MS` before ``now_ms`` (and after the
    epoch) to :data:`core.events.MAX_FUTURE_MS` after it; ``features`` exactly
    ``item_width`` numbers when it is known."""
    params = {
        "max_items": max_items,
        "oldest_ts": max(1, now_ms - MAX_AGE_MS),
        "newest_ts": now_ms + MAX_FUTURE_MS,
    }
    if item_width:
        params["item_width"] = item_width
    return params


ID = Str(min_length=1, max_bytes=MAX_ID_BYTES, description="the tenant's own id")
NUMBER = Num(minimum=-FLOAT32_MAX, maximum=FLOAT32_MAX)

# Requests ---------------------------------------------------------------------------------

RECOMMEND_REQUEST = Obj(
    description="POST /v1/recommend; other properties are ignored",
    props={
        "user_id": Prop(ID, required=True),
        "num_items": Prop(Int(minimum=1, maximum=MAX_ITEMS), default=DEFAULT_NUM_ITEMS),
        "context": Prop(
            Map(
                values=Scalar(),
                max_entries=MAX_CONTEXT_ENTRIES,
                description="request context: names to strings or numbers",
            ),
            default={},
        ),
        "debug": Prop(
            Bool(description="explain each stage (stages, propensities, trace_id)"),
            default=False,
        ),
    },
)


def _attributes(values: Model, description: str) -> Prop:
    """An ``attributes`` map bounded as ``core.catalog.check_attributes`` bounds it."""
    return Prop(
        Map(
            values=values,
            keys=Str(max_bytes=MAX_ATTRIBUTE_BYTES),
            max_entries=MAX_ATTRIBUTES,
            description=description,
        ),
        default={},
    )


EVENT = Obj(
    description="one event; other properties are ignored",
    props={
        "event_id": Prop(
            Str(
                min_length=1,
                max_length=MAX_EVENT_ID,
                description="caller-chosen unique id, the idempotency key: a repeated id is "
                "acknowledged and not stored twice",
            ),
            required=True,
        ),
        "type": Prop(Str(enum=tuple(sorted(CLIENT_TYPES))), required=True),
        "user_id": Prop(ID, required=True),
        "item_id": Prop(
            Str(
                max_bytes=MAX_ID_BYTES,
                description="the tenant's own id of the item; empty or absent: none",
            ),
            default="",
        ),
        "request_id": Prop(
            Str(max_bytes=MAX_REQUEST_ID_BYTES, description="the answer the event is about"),
            default="",
        ),
        "ts": Prop(
            Int(
                minimum=OLDEST_TS,
                maximum=NEWEST_TS,
                note=f"ms since the epoch, at most {MAX_AGE_MS // 86_400_000} days old (an "
                f"older retry could count twice) and {MAX_FUTURE_MS // 3_600_000} hours ahead",
                description=f"event time, ms since the Unix epoch: at most "
                f"{MAX_AGE_MS // 86_400_000} days before the gateway's clock and "
                f"{MAX_FUTURE_MS // 3_600_000} hours after it (the bounds here are those of "
                "the moment this document was made)",
            ),
            required=True,
        ),
        "position": Prop(
            Int(minimum=INT32[0], maximum=INT32[1], description="position in the answer"),
            default=0,
        ),
        "propensity": Prop(Num(minimum=0.0, maximum=1.0), default=0.0),
        "attributes": _attributes(
            Scalar(max_bytes=MAX_ATTRIBUTE_BYTES),
            "names to strings or numbers (a number is kept as its text)",
        ),
    },
)

EVENTS_REQUEST = Obj(
    description="POST /v1/events",
    props={"events": Prop(Arr(items=EVENT, min_items=1, max_items=MAX_BATCH), required=True)},
)

ITEM = Obj(
    closed=True,
    description="one catalog item",
    props={
        "item_id": Prop(ID, required=True),
        "category": Prop(
            Int(
                minimum=0,
                maximum=INT32[1],
                description="a category the models were not trained on is embedded without one",
            ),
            default=0,
        ),
        "features": Prop(
            Arr(
                items=NUMBER,
                min_items=Param("item_width", 1),
                max_items=ITEM_WIDTH,
                description="exactly the tenant's item feature width of numbers float32 holds",
            ),
            required=True,
        ),
        "attributes": _attributes(
            Str(max_bytes=MAX_ATTRIBUTE_BYTES), "other attributes, kept with the item in the log"
        ),
        "available": Prop(
            Bool(description="false keeps the item in the catalog but never serves it"),
            default=True,
        ),
    },
)

ITEMS_REQUEST = Obj(
    description="PUT /v1/items",
    props={
        "items": Prop(Arr(items=ITEM, min_items=1, max_items=MAX_ITEMS_PER_CALL), required=True)
    },
)

# Responses --------------------------------------------------------------------------------

ERROR = Obj(
    closed=True,
    description="an error: its gRPC status code name, a message, and the request field at "
    "fault when there is one",
    props={
        "error": Prop(Str(enum=tuple(code.name for code in grpc.StatusCode)), required=True),
        "message": Prop(Str(), required=True),
        "field": Prop(Str(description="the request field at fault")),
    },
)

ACCEPTED = Obj(
    closed=True,
    props={
        "accepted": Prop(
            Int(minimum=0, maximum=INT32[1], description="entries accepted (stored once)"),
            required=True,
        )
    },
)

SOURCES = tuple(
    value.name.removeprefix("SOURCE_").lower() for value in common_pb2.Source.DESCRIPTOR.values
)
_FLOAT = Num(description="a finite number")
_COUNT = Int(minimum=0)

STAGE = Obj(
    closed=True,
    props={
        "stage": Prop(Str(), required=True),
        "elapsed_ms": Prop(_FLOAT, required=True),
        "budget_ms": Prop(_FLOAT, required=True),
        "candidates_in": Prop(_COUNT, required=True),
        "candidates_out": Prop(_COUNT, required=True),
        "degraded": Prop(Bool(), required=True),
        "reason": Prop(Str(description="why it degraded; empty when it did not"), required=True),
        "details": Prop(Map(values=_FLOAT), required=True),
    },
)

RECOMMENDATION = Obj(
    closed=True,
    description="ranked items, best first",
    props={
        "request_id": Prop(Str(), required=True),
        "items": Prop(
            Arr(
                items=Obj(
                    closed=True,
                    props={
                        "item_id": Prop(ID, required=True),
                        "score": Prop(_FLOAT, required=True),
                        "rank": Prop(Int(minimum=1), required=True),
                        "source": Prop(Str(enum=SOURCES), required=True),
                        "propensity": Prop(
                            Num(
                                minimum=0.0,
                                maximum=1.0,
                                description="debug only: the probability the item had of "
                                "being shown",
                            )
                        ),
                    },
                )
            ),
            required=True,
        ),
        "experiments": Prop(
            Arr(
                items=Obj(
                    closed=True,
                    props={
                        "key": Prop(Str(), required=True),
                        "variant": Prop(Str(), required=True),
                    },
                )
            ),
            required=True,
        ),
        "degraded": Prop(
            Arr(items=Str(), description="stages that fell back"),
            required=True,
        ),
        "stage_ms": Prop(Map(values=_FLOAT), required=True),
        "stages": Prop(Arr(items=STAGE, description="debug only: each stage explained")),
        "trace_id": Prop(Str(description="debug only, when the request was traced")),
    },
)

REPORT = proto_json(
    experiment_pb2.Report.DESCRIPTOR,
    description="an experiment's report from the tenant's event log (docs/experiments.md, "
    "Report): recmesh.experiment.v1.Report in proto3 JSON with the proto's field names "
    "(64-bit integers as decimal strings)",
)

HEALTH = Obj(
    closed=True,
    props={
        "status": Prop(Str(enum=("SERVING", "NOT_SERVING")), required=True),
        "draining": Prop(Bool(), required=True),
        "dependencies": Prop(
            Map(values=Str(), description="each dependency's grpc.health.v1 status"),
            required=True,
        ),
    },
)

ERASURE = Obj(
    closed=True,
    description="an erasure: `erased` with its counts, or `pending` (the gateway stopped "
    "waiting; counts are zeros, audit_position empty; ask again to confirm)",
    props={
        "tenant": Prop(Str(), required=True),
        "status": Prop(Str(enum=("erased", "pending")), required=True),
        "subject": Prop(
            Str(description="the user as the audit names it: sha256:<hex>"), required=True
        ),
        **{name: Prop(_COUNT, required=True) for name in ERASURE_COUNTS},
        "audit_position": Prop(Str(), required=True),
    },
)

COMPONENTS: dict[str, Model] = {
    "RecommendRequest": RECOMMEND_REQUEST,
    "EventsRequest": EVENTS_REQUEST,
    "ItemsRequest": ITEMS_REQUEST,
    "Recommendation": RECOMMENDATION,
    "Accepted": ACCEPTED,
    "Report": REPORT,
    "Erasure": ERASURE,
    "Health": HEALTH,
    "Error": ERROR,
}
"""The named models of the OpenAPI document's ``components.schemas``."""

# Parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecommendBody:
    user_id: str
    num_items: int
    context: dict[str, str]
    debug: bool


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw`` (``NaN`` and ``Infinity``, which Python's decoder would
    take, are not JSON).

    Raises:
        InvalidArgument: not UTF-8 JSON, or nested too deeply to decode (field ``body``).
    """
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}", field="body") from exc


MAX_REQUEST_ID_HEADER = 64
_PRINTABLE_ASCII = re.compile(r"[!-~]+")


def client_request_id(header: str) -> str:
    """The request id a client sent (``x-request-id``): its first
    :data:`MAX_REQUEST_ID_HEADER` characters when they are printable ASCII without spaces
    (what gRPC metadata and the logs carry as they are), else "" (the gateway makes one)."""
    kept = header[:MAX_REQUEST_ID_HEADER]
    return kept if _PRINTABLE_ASCII.fullmatch(kept) else ""


def parse_recommend(raw: bytes, params: Params) -> RecommendBody:
    """Parse and check ``POST /v1/recommend`` (:data:`RECOMMEND_REQUEST`).

    Raises:
        InvalidArgument: what the model refuses, naming the field.
    """
    body = RECOMMEND_REQUEST.check(parse_json(raw), "", params)
    return RecommendBody(
        user_id=body["user_id"],
        num_items=body["num_items"],
        context=body["context"],
        debug=body["debug"],
    )


def parse_events(raw: bytes, params: Params) -> list[gateway_pb2.ClientEvent]:
    """Parse and check ``POST /v1/events`` (:data:`EVENTS_REQUEST`) into the gRPC API's
    client events (checked again, as a batch, by :func:`client_events`).

    Raises:
        InvalidArgument: what the model refuses, named as ``events[i].field``.
    """
    body = EVENTS_REQUEST.check(parse_json(raw), "", params)
    return [
        gateway_pb2.ClientEvent(
            event_id=event["event_id"],
            type=event["type"],
            user_id=event["user_id"],
            item_id=event["item_id"],
            request_id=event["request_id"],
            ts_ms=event["ts"],
            position=event["position"],
            propensity=event["propensity"],
            attributes=event["attributes"],
        )
        for event in body["events"]
    ]


def client_events(
    batch: list[gateway_pb2.ClientEvent], now_ms: int | None = None
) -> list[events_pb2.Event]:
    """A client's batch as log events, checked (both APIs) as of ``now_ms`` (default: now):
    the item named by the tenant's own id (``item_ref``; the log maps it to its internal id).

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
        if client.type in EVENT_TYPES - CLIENT_TYPES:
            raise InvalidArgument(
                f"{client.type} events are the gateway's own (experiment reports count them); "
                f"a client posts one of {sorted(CLIENT_TYPES)}",
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
    validate_batch(events, now_ms)
    check_fresh(events, now_ms)
    return events


def parse_items(raw: bytes, params: Params) -> list[ItemInput]:
    """Parse and check ``PUT /v1/items`` (:data:`ITEMS_REQUEST`; the feature width is
    checked by ``gateway.catalog`` unless ``params`` has it).

    Raises:
        InvalidArgument: what the model refuses (an unknown field too), named as
            ``items[i].field``.
    """
    body = ITEMS_REQUEST.check(parse_json(raw), "", params)
    return [
        ItemInput(
            ref=item["item_id"],
            category=item["category"],
            features=item["features"],
            attributes=item["attributes"],
            available=item["available"],
        )
        for item in body["items"]
    ]
