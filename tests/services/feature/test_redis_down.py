"""A service whose Redis is unreachable answers UNAVAILABLE and reports NOT_SERVING."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh.ports import free_port
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.feature.server import build_service
from services.feature.settings import FeatureSettings


async def test_unreachable_redis_is_unavailable_not_internal(artifacts_root: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = await built_server(
        build_service, FeatureSettings(port=0, redis_url=dead, artifacts=artifacts_root)
    )
    async with serving(server), channel_to(server) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await feature_pb2_grpc.FeatureServiceStub(channel).GetUserFeatures(
                feature_pb2.GetUserFeaturesRequest(user_id="u1"), metadata=tenant_metadata("demo")
            )
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
