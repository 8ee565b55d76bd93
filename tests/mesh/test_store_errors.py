"""A Redis or Valkey Cluster out of reach is UNAVAILABLE to callers, never INTERNAL.

The server interceptor (:mod:`mesh.server`) and the monolith's local stubs (:mod:`mesh.local`)
map the Redis client's errors with :func:`mesh.errors.store_unavailable`: a single server
refusing connections and a cluster that cannot serve a slot (CLUSTERDOWN, TRYAGAIN, MOVED
until the client gave up, no node reachable) are transient; a cross-slot command or another
error reply is a bug and stays INTERNAL.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc
from redis import exceptions as redis_errors

from mesh.errors import store_unavailable
from mesh.local import local_stub
from mesh.server import MeshServer
from mesh.service import Registration, Service
from mesh.settings import ServerSettings
from mesh.testing import channel_to, serving


def unreachable_cluster() -> Exception:
    """What a cluster client raises when its topology refresh reached no node."""
    exc = redis_errors.RedisClusterException("Redis Cluster cannot be connected")
    exc.__cause__ = redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:7000")
    return exc


UNAVAILABLE: dict[str, Exception] = {
    "connection": redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379"),
    "timeout": redis_errors.TimeoutError("Timeout reading from socket"),
    "cluster-down": redis_errors.ClusterDownError("The cluster is down"),
    "master-down": redis_errors.MasterDownError("Link with MASTER is down"),
    "try-again": redis_errors.TryAgainError("Multiple keys request during rehashing of slot"),
    "moved": redis_errors.MovedError("3999 127.0.0.1:7001"),
    "ttl-exhausted": redis_errors.ClusterError("TTL exhausted."),
    "slot-not-covered": redis_errors.SlotNotCoveredError('Slot "3999" is not covered'),
    "unreachable-cluster": unreachable_cluster(),
}
INTERNAL: dict[str, Exception] = {
    "cross-slot": redis_errors.ClusterCrossSlotError(),
    "wrong-type": redis_errors.ResponseError("WRONGTYPE Operation against a key"),
    "cluster-usage": redis_errors.RedisClusterException("unsupported in cluster mode"),
}


@pytest.mark.parametrize("exc", list(UNAVAILABLE.values()), ids=list(UNAVAILABLE))
def test_store_unavailable(exc: Exception) -> None:
    assert store_unavailable(exc)


@pytest.mark.parametrize("exc", list(INTERNAL.values()), ids=list(INTERNAL))
def test_a_bug_is_not_unavailability(exc: Exception) -> None:
    assert not store_unavailable(exc)


class Failing(experiment_pb2_grpc.ExperimentServiceServicer):
    """Assign raises whatever ``error`` holds, as a handler whose Redis call failed would."""

    def __init__(self) -> None:
        self.error: Exception = RuntimeError("unset")

    async def Assign(self, request: Any, context: Any) -> experiment_pb2.AssignResponse:
        raise self.error

    async def GetReport(self, request: Any, context: Any) -> experiment_pb2.Report:
        raise self.error


async def test_the_interceptor_maps_cluster_errors_to_unavailable() -> None:
    servicer = Failing()
    service = Service(
        [Registration.of(servicer, experiment_pb2, experiment_pb2_grpc, "ExperimentService")]
    )
    server = MeshServer(ServerSettings(port=0, drain_delay_s=0.0, tls=False), service)
    codes: dict[str, grpc.StatusCode] = {}
    async with serving(server), channel_to(server) as channel:
        stub = experiment_pb2_grpc.ExperimentServiceStub(channel)
        for name, exc in {**UNAVAILABLE, **INTERNAL}.items():
            servicer.error = exc
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Assign(experiment_pb2.AssignRequest(user_id="u1"), timeout=5)
            codes[name] = raised.value.code()
    assert codes == {
        **{name: grpc.StatusCode.UNAVAILABLE for name in UNAVAILABLE},
        **{name: grpc.StatusCode.INTERNAL for name in INTERNAL},
    }


@pytest.mark.parametrize("name", ["cluster-down", "try-again", "ttl-exhausted"])
async def test_a_local_stub_maps_them_the_same_way(name: str) -> None:
    servicer = Failing()
    servicer.error = UNAVAILABLE[name]
    stub = local_stub(servicer)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Assign(experiment_pb2.AssignRequest(user_id="u1"), timeout=1.0)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
