"""``recmesh explain <request_id>``: why an answer showed what it showed, from the event log.

Traces are sampled; the event log is not. Every impression the gateway logs for its own
answer carries the answer's lineage (``recmesh.events.v1.Event``: position, score,
propensity, candidate source, experiment variants, the retrieval and ranking artifact-set
versions, the degraded stages), and the events service indexes each request's events
(``ReadRequestEvents``). Clicks, conversions and dismissals posted by the application name
the request too, and join back to the impression of the same item.

The log is per tenant: without ``--tenant`` every tenant of the registry is asked, and the
one that has the request answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from mesh.context import TENANT_KEY
from mesh.tls import PLAINTEXT, Transport

OUTCOMES = ("click", "conversion", "dismiss")
"""Event types that report what the user did with a shown item."""


def explanation(
    request_id: str, tenant: str, stored: Iterable[events_pb2.StoredEvent]
) -> dict[str, Any]:
    """The lineage of one answer from its stored events (impressions and outcomes).

    The request-level fields (user, time, versions, variants, degraded stages) come from
    its impressions, which all carry the same values. Each shown item lists the outcomes
    logged for it; outcomes naming the request but no shown item are kept apart in
    ``unmatched``.
    """
    events = [entry.event for entry in stored]
    impressions = sorted(
        (e for e in events if e.type == "impression"), key=lambda e: (e.position, e.event_id)
    )
    outcomes: dict[int, list[str]] = {}
    for event in events:
        if event.type in OUTCOMES:
            outcomes.setdefault(event.item_id, []).append(event.type)
    shown = {e.item_id for e in impressions}
    first = impressions[0] if impressions else None
    return {
        "request_id": request_id,
        "tenant": tenant,
        "user_id": first.user_id if first else "",
        "ts_ms": first.ts_ms if first else 0,
        "retrieval_version": first.retrieval_version if first else "",
        "ranking_version": first.ranking_version if first else "",
        "variants": dict(sorted(first.variants.items())) if first else {},
        "degraded": list(first.degraded) if first else [],
        "items": [
            {
                "position": e.position,
                "item_id": e.item_id,
                "score": round(e.score, 6),
                "propensity": round(e.propensity, 6),
                "source": _source(e.source),
                "outcomes": outcomes.get(e.item_id, []),
            }
            for e in impressions
        ],
        "unmatched": [
            {"type": e.type, "item_id": e.item_id, "event_id": e.event_id}
            for e in events
            if e.type in OUTCOMES and e.item_id not in shown
        ],
    }


def render(explained: dict[str, Any]) -> list[str]:
    """The explanation as lines for a terminal."""
    variants = ", ".join(f"{k}={v}" for k, v in explained["variants"].items()) or "none"
    lines = [
        f"request {explained['request_id']} of tenant {explained['tenant']}, "
        f"user {explained['user_id']}, at {_iso(explained['ts_ms'])}",
        f"  retrieval set {explained['retrieval_version'] or '- (did not answer)'}",
        f"  ranking set   {explained['ranking_version'] or '- (did not answer)'}",
        f"  variants      {variants}",
        f"  degraded      {', '.join(explained['degraded']) or 'none'}",
        f"  {'pos':>3}  {'item':>10}  {'score':>10}  {'propensity':>10}  {'source':<9} outcomes",
    ]
    for item in explained["items"]:
        lines.append(
            f"  {item['position']:>3}  {item['item_id']:>10}  {item['score']:>10.4f}  "
            f"{item['propensity']:>10.4f}  {item['source']:<9} "
            f"{', '.join(item['outcomes']) or '-'}"
        )
    for event in explained["unmatched"]:
        lines.append(
            f"  ({event['type']} of item {event['item_id']} names this request, "
            f"which did not show it: {event['event_id']})"
        )
    return lines


def request_events(
    address: str,
    tenant: str,
    request_id: str,
    timeout_s: float = 5.0,
    *,
    transport: Transport = PLAINTEXT,
) -> list[events_pb2.StoredEvent]:
    """The stored events of ``request_id`` in ``tenant``'s log (the events service at
    ``address``).

    Raises:
        grpc.RpcError: the events service refused or could not be reached.
    """
    with transport.sync_channel(address, server="events") as channel:
        reply = events_pb2_grpc.EventServiceStub(channel).ReadRequestEvents(
            events_pb2.ReadRequestEventsRequest(request_id=request_id),
            metadata=((TENANT_KEY, tenant),),
            timeout=timeout_s,
        )
    return list(reply.events)


def show(
    request_id: str,
    address: str,
    tenants: Sequence[str],
    as_json: bool,
    *,
    transport: Transport = PLAINTEXT,
) -> tuple[int, str]:
    """Exit code and output of ``recmesh explain``: the first of ``tenants`` whose log has
    the request; 1 when none has it or the events service cannot be asked."""
    for tenant in tenants:
        try:
            stored = request_events(address, tenant, request_id, transport=transport)
        except grpc.RpcError as exc:
            return 1, f"error: the events service at {address} answered {exc.code().name}"
        if stored:
            explained = explanation(request_id, tenant, stored)
            text = json.dumps(explained, indent=2) if as_json else "\n".join(render(explained))
            return 0, text
    return 1, (
        f"no events of request {request_id} in the log of {', '.join(tenants)} "
        "(never logged, or older than the events' dedupe window)"
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _source(source: int) -> str:
    return common_pb2.Source.Name(source).removeprefix("SOURCE_").lower()  # type: ignore[arg-type]
