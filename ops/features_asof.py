"""``recmesh features asof --tenant T --user U --at <ISO 8601 time> [--json]``: a user's
features as of a past time, computed from the event log.

Asks the feature service for ``GetUserFeatures`` with ``as_of_ms`` (see
``services.feature.asof``): the materialised history followed by the user's clicks and
conversions appended to the log at or before that time, the category shares of those
outcomes, and whether the user had a materialised row. The append time decides what
belongs before the time, not the time the client gave an event. A time without a UTC
offset is taken as UTC.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import grpc
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh.context import TENANT_KEY
from mesh.tls import PLAINTEXT, Transport


def parse_time(text: str) -> int:
    """``text`` (ISO 8601, e.g. ``2026-12-04T19:59:57Z`` or ``2026-12-04 20:59:57+01:00``)
    in ms since the epoch; a time without an offset is UTC.

    Raises:
        argparse.ArgumentTypeError: not an ISO 8601 time.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def user_features(
    address: str,
    tenant: str,
    user_id: str,
    as_of_ms: int,
    timeout_s: float = 10.0,
    *,
    transport: Transport = PLAINTEXT,
) -> feature_pb2.GetUserFeaturesResponse:
    """``user_id``'s features in ``tenant`` as of ``as_of_ms``, from the feature service at
    ``address``.

    Raises:
        grpc.RpcError: the feature service refused (a time in the future, before the log's
            horizon...) or could not be reached.
    """
    with transport.sync_channel(address, server="feature") as channel:
        reply: feature_pb2.GetUserFeaturesResponse = feature_pb2_grpc.FeatureServiceStub(
            channel
        ).GetUserFeatures(
            feature_pb2.GetUserFeaturesRequest(user_id=user_id, as_of_ms=as_of_ms),
            metadata=((TENANT_KEY, tenant),),
            timeout=timeout_s,
        )
    return reply


def report(
    tenant: str, user_id: str, as_of_ms: int, reply: feature_pb2.GetUserFeaturesResponse
) -> dict[str, Any]:
    """The answer as a JSON-ready object; category shares largest first, keyed by the
    category as text (JSON keys are strings)."""
    shares = sorted(reply.category_shares.items(), key=lambda pair: (-pair[1], pair[0]))
    return {
        "tenant": tenant,
        "user_id": user_id,
        "as_of": _iso(as_of_ms),
        "as_of_ms": as_of_ms,
        "is_default": reply.is_default,
        "history": list(reply.history),
        "category_shares": {str(category): round(share, 6) for category, share in shares},
    }


def render(answer: dict[str, Any]) -> list[str]:
    """The answer as lines for a terminal."""
    shares = ", ".join(f"{c}: {s:.1%}" for c, s in answer["category_shares"].items())
    history = " ".join(str(item) for item in answer["history"])
    return [
        f"user {answer['user_id']} of tenant {answer['tenant']} as of {answer['as_of']}",
        f"  is_default       {str(answer['is_default']).lower()}",
        f"  history          {history or '-'} ({len(answer['history'])} items, newest last)",
        f"  category shares  {shares or '-'}",
    ]


def show(
    address: str,
    tenant: str,
    user_id: str,
    as_of_ms: int,
    as_json: bool,
    *,
    transport: Transport = PLAINTEXT,
) -> tuple[int, str]:
    """Exit code and output of ``recmesh features asof``: 1 when the feature service
    refused or could not be asked."""
    try:
        reply = user_features(address, tenant, user_id, as_of_ms, transport=transport)
    except grpc.RpcError as exc:
        return (
            1,
            f"error: the feature service at {address} answered {exc.code().name}: {exc.details()}",
        )
    answer = report(tenant, user_id, as_of_ms, reply)
    return 0, json.dumps(answer, indent=2) if as_json else "\n".join(render(answer))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
