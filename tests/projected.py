"""Events through the projector's own code, for the tests of what reads its projections
(the feature service's counters and trending items, retrieval's trending source, ranking's
recent CTR): appended to a tenant's log as the events service appends them, then applied
by a :class:`~services.projector.consumer.StreamProjector` until it has caught up."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from recmesh.events.v1 import events_pb2

from core import keys
from mesh import redis as mesh_redis
from mesh.faults import write_flags
from mesh.server import MeshServer
from mesh.testing import built_server, serving
from services.feature.server import build_service as build_feature
from services.feature.settings import FeatureSettings
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections

HALF_LIFE_S = 3600.0
"""The projector's default half-life, which the services under test decay with too."""

HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


def event(kind: str, user: str, item: int, ts_ms: int | None = None) -> events_pb2.Event:
    """One event with a fresh id (``ts_ms`` defaults to now)."""
    return events_pb2.Event(
        event_id=uuid.uuid4().hex,
        type=kind,
        user_id=user,
        item_id=item,
        ts_ms=now_ms() if ts_ms is None else ts_ms,
    )


async def project(redis_url: str, tenant: str, events: list[events_pb2.Event]) -> None:
    """Append ``events`` to ``tenant``'s log and project the log to its end."""
    client = mesh_redis.client(redis_url)
    try:
        reader = StreamProjector(
            client,
            Projections(client, history_cap=200, half_life_s=HALF_LIFE_S, applied_ttl_s=600),
            [tenant],
            group="projector",
            consumer="test",
        )
        await reader.prepare()
        for entry in events:
            await client.xadd(keys.events(tenant), {"e": entry.SerializeToString()})
        while await reader.read_once():
            pass
    finally:
        await client.aclose()


@asynccontextmanager
async def feature_service(
    redis_url: str, artifacts: Path, faults: Path
) -> AsyncIterator[MeshServer]:
    """A feature service on ``redis_url`` decaying counters with :data:`HALF_LIFE_S`,
    watching ``faults`` (created empty) for fault flags."""
    write_flags(faults, {})
    settings = FeatureSettings(
        port=0,
        redis_url=redis_url,
        artifacts=artifacts,
        half_life_s=HALF_LIFE_S,
        faults_file=str(faults),
        drain_delay_s=0,
    )
    async with serving(await built_server(build_feature, settings)) as running:
        yield running
