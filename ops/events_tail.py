"""``recmesh events tail --tenant T [--user U] [--type K] [--limit N] [--json]``: the newest
events of a tenant's log, for operators and tests.

Reads the log through the events service (``Read``, in log order, a page at a time) and
prints the last ``limit`` events that match. Lineage fields are shown for impressions.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from typing import Any

from google.protobuf.json_format import MessageToDict
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from mesh.context import TENANT_KEY
from mesh.tls import PLAINTEXT, Transport

PAGE = 100
"""Entries asked for per ``Read`` (the service refuses more than its ``max_read``, 1000 by
default)."""


def stored_events(
    address: str,
    tenant: str,
    page: int = PAGE,
    timeout_s: float = 5.0,
    *,
    transport: Transport = PLAINTEXT,
) -> Iterator[events_pb2.StoredEvent]:
    """Every stored event of ``tenant``, oldest first, read ``page`` entries at a time.

    Raises:
        grpc.RpcError: the events service refused or could not be reached.
    """
    after = ""
    with transport.sync_channel(address, server="events") as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        while True:
            reply = stub.Read(
                events_pb2.ReadRequest(after=after, limit=page),
                metadata=((TENANT_KEY, tenant),),
                timeout=timeout_s,
            )
            yield from reply.events
            if len(reply.events) < page:
                return
            after = reply.events[-1].position


def tail(
    entries: Iterator[events_pb2.StoredEvent], limit: int, user: str = "", kind: str = ""
) -> list[dict[str, Any]]:
    """The last ``limit`` entries whose user is ``user`` and type ``kind`` (empty: any),
    each as its stream position (``log_position``) plus every field of the event (proto3
    JSON mapping: 64-bit integers as strings, enums by name, zero values included)."""
    kept: deque[events_pb2.StoredEvent] = deque(maxlen=limit)
    for entry in entries:
        if (not user or entry.event.user_id == user) and (not kind or entry.event.type == kind):
            kept.append(entry)
    return [
        {
            "log_position": entry.position,
            **MessageToDict(
                entry.event,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            ),
        }
        for entry in kept
    ]


def render(rows: list[dict[str, Any]], as_json: bool) -> str:
    """One JSON object per line, or aligned text."""
    if as_json:
        return "\n".join(json.dumps(row, sort_keys=True) for row in rows)
    lines = []
    for row in rows:
        extra = " ".join(
            f"{name}={row[name]}"
            for name in ("request_id", "position", "source", "score", "propensity")
            if name in row
        )
        lines.append(
            f"{row['log_position']:<18} {row.get('type', ''):<11} user={row.get('user_id', '')} "
            f"item={row.get('item_id', '0')} {extra}".rstrip()
        )
    return "\n".join(lines)
