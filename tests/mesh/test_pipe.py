"""Pipes (mesh.pipe): unary calls carried on one stream mean what a unary call means.

A real server (``MeshServer``) serves a test servicer of the experiment contract; each
test calls it through a :class:`PipeStub` and, where the point is equality with a unary
call, through the generated stub too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc
from recmesh.mesh.v1 import pipe_pb2

from mesh.client import Downstream, open_channel
from mesh.context import TENANT_KEY, request_id_var, tenant_var
from mesh.errors import InvalidArgument, ResourceExhausted
from mesh.pipe import PipeStub, service_of
from mesh.server import MeshServer
from mesh.service import Registration, Service
from mesh.settings import ServerSettings
from mesh.testing import serving

SERVICE = "recmesh.experiment.v1.ExperimentService"


class Servicer(experiment_pb2_grpc.ExperimentServiceServicer):
    """Answers with the tenant and request id it was called with; some users misbehave."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def Assign(
        self, request: experiment_pb2.AssignRequest, context: object
    ) -> experiment_pb2.AssignResponse:
        if request.user_id == "slow":
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.user_id == "busy":
            raise ResourceExhausted("too many", retry_after_s=2.0)
        if request.user_id == "bad":
            raise InvalidArgument("user_id is bad", field="user_id")
        if request.user_id == "bug":
            raise RuntimeError("a bug")
        if request.user_id.startswith("wait"):
            await asyncio.sleep(int(request.user_id[4:]) / 1000)
        return experiment_pb2.AssignResponse(
            book_version=f"{tenant_var.get()}|{request_id_var.get()}|{request.user_id}"
        )

    async def GetReport(
        self, request: experiment_pb2.GetReportRequest, context: object
    ) -> experiment_pb2.Report:
        raise InvalidArgument("no reports here")


def build(servicer: Servicer, port: int = 0) -> MeshServer:
    registration = Registration.of(
        servicer, experiment_pb2, experiment_pb2_grpc, "ExperimentService"
    )
    settings = ServerSettings(port=port, drain_delay_s=0.0, tls=False, service_name="experiment")
    return MeshServer(settings, Service([registration]))


@pytest.fixture
async def served() -> AsyncIterator[tuple[MeshServer, Servicer]]:
    servicer = Servicer()
    server = build(servicer)
    async with serving(server):
        yield server, servicer


def target(server: MeshServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
async def pipe(served: tuple[MeshServer, Servicer]) -> AsyncIterator[PipeStub]:
    server, _ = served
    async with open_channel(target(server)) as channel:
        stub = PipeStub(channel, SERVICE, target(server))
        yield stub
        await stub.close()


def assign(user: str) -> experiment_pb2.AssignRequest:
    return experiment_pb2.AssignRequest(user_id=user)


def test_the_service_of_a_generated_stub() -> None:
    assert service_of(experiment_pb2_grpc.ExperimentServiceStub) == SERVICE
    assert service_of(feature_pb2_grpc.FeatureServiceStub) == "recmesh.feature.v1.FeatureService"


async def test_a_piped_call_answers_as_a_unary_call_with_the_callers_context(
    served: tuple[MeshServer, Servicer], pipe: PipeStub
) -> None:
    server, _ = served
    tenant_var.set("demo")
    request_id_var.set("r-1")
    piped = await pipe.Assign(assign("u1"), timeout=2)
    async with open_channel(target(server)) as channel:
        unary = await experiment_pb2_grpc.ExperimentServiceStub(channel).Assign(
            assign("u1"), timeout=2
        )
    assert piped == unary
    assert piped.book_version == "demo|r-1|u1"


@pytest.mark.parametrize(
    ("user", "code", "trailing"),
    [
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, {"retry-after": "2.000"}),
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, {"x-recmesh-field": "user_id"}),
        ("bug", grpc.StatusCode.INTERNAL, {}),
    ],
)
async def test_a_failure_carries_the_status_details_and_trailers_of_a_unary_call(
    served: tuple[MeshServer, Servicer],
    pipe: PipeStub,
    user: str,
    code: grpc.StatusCode,
    trailing: dict[str, str],
) -> None:
    server, _ = served
    tenant_var.set("demo")
    with pytest.raises(grpc.aio.AioRpcError) as piped:
        await pipe.Assign(assign(user), timeout=2)
    async with open_channel(target(server)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await experiment_pb2_grpc.ExperimentServiceStub(channel).Assign(assign(user), timeout=2)
    assert piped.value.code() == unary.value.code() == code
    assert piped.value.details() == unary.value.details()
    sent = dict(piped.value.trailing_metadata() or ())
    assert {key: sent.get(key) for key in trailing} == trailing
    # The stream survives a failed call.
    assert (await pipe.Assign(assign("u2"), timeout=2)).book_version.endswith("|u2")


async def test_a_call_past_its_timeout_fails_and_the_server_cancels_it(
    served: tuple[MeshServer, Servicer], pipe: PipeStub
) -> None:
    _, servicer = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pipe.Assign(assign("slow"), timeout=0.1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(servicer.cancelled.wait(), 2)


async def test_concurrent_calls_get_their_own_answers_in_any_order(pipe: PipeStub) -> None:
    users = [f"wait{(i * 7) % 20}" for i in range(200)]
    replies = await asyncio.gather(*(pipe.Assign(assign(user), timeout=5) for user in users))
    assert [reply.book_version.rsplit("|", 1)[1] for reply in replies] == users


async def test_a_method_the_server_does_not_serve_is_unimplemented(
    served: tuple[MeshServer, Servicer],
) -> None:
    server, _ = served
    async with open_channel(target(server)) as channel:
        features = PipeStub(channel, "recmesh.feature.v1.FeatureService", target(server))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await features.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="u"))
        await features.close()
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_draining_server_refuses_new_calls_as_unavailable(
    served: tuple[MeshServer, Servicer], pipe: PipeStub
) -> None:
    server, _ = served
    await pipe.Assign(assign("u1"), timeout=2)
    assert server.pipe is not None
    server.pipe.drain()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pipe.Assign(assign("u2"), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_restarted_server_is_reached_again_on_a_new_stream() -> None:
    first = build(Servicer())
    await first.start()
    port = first.port
    async with open_channel(f"127.0.0.1:{port}") as channel:
        stub = PipeStub(channel, SERVICE, f"127.0.0.1:{port}")
        tenant_var.set("demo")
        assert (await stub.Assign(assign("u1"), timeout=2)).book_version.endswith("|u1")
        slow = asyncio.ensure_future(stub.Assign(assign("wait500"), timeout=5))
        await asyncio.sleep(0.05)
        await first.stop(grace_s=0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await slow
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        second = build(Servicer(), port)
        async with serving(second):
            for _ in range(50):  # the channel reconnects within its backoff (at most 1 s)
                try:
                    reply = await stub.Assign(assign("u3"), timeout=1)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the restarted server was never reached")
            assert reply.book_version.endswith("|u3")
        await stub.close()


async def test_a_downstream_opened_with_a_pipe_calls_through_it(
    served: tuple[MeshServer, Servicer],
) -> None:
    server, _ = served
    downstream = Downstream.open(
        "experiment", target(server), experiment_pb2_grpc.ExperimentServiceStub, pipe=True
    )
    assert isinstance(downstream.stub, PipeStub)
    tenant_var.set("acme")
    reply = await downstream.call(downstream.stub.Assign, assign("u9"), cap_s=2)
    assert reply.book_version.startswith("acme|")
    await downstream.close()


async def test_a_corrupt_message_is_refused_and_the_stream_goes_on(
    served: tuple[MeshServer, Servicer],
) -> None:
    server, _ = served
    valid = pipe_pb2.ExchangeRequest(
        id=7,
        method=f"/{SERVICE}/Assign",
        payload=assign("u1").SerializeToString(),
        timeout_s=2,
        metadata={TENANT_KEY: "demo"},
    ).SerializeToString()
    async with open_channel(target(server)) as channel:
        exchange = channel.stream_stream(
            "/recmesh.mesh.v1.PipeService/Exchange",
            request_serializer=lambda raw: raw,
            response_deserializer=pipe_pb2.ExchangeResponse.FromString,
        )
        replies = [reply async for reply in exchange(iter([b"\x00" * 8, valid]), timeout=5)]
    assert [(r.id, r.code) for r in replies] == [
        (0, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        (7, 0),
    ]
    assert experiment_pb2.AssignResponse.FromString(replies[1].payload).book_version.startswith(
        "demo|"
    )


async def test_callers_giving_up_mid_flight_leave_the_stream_working(pipe: PipeStub) -> None:
    """Timeouts and cancelled callers (a stage's budget spent) by the hundred, interleaved
    with calls that complete: every later call is still answered."""
    tenant_var.set("demo")

    async def give_up(i: int) -> None:
        call = asyncio.ensure_future(pipe.Assign(assign(f"wait{i % 30}"), timeout=0.02))
        if i % 2:
            await asyncio.sleep(0.001 * (i % 7))
            call.cancel()
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await call

    await asyncio.gather(
        *(give_up(i) for i in range(300)),
        *(pipe.Assign(assign(f"ok{i}"), timeout=5) for i in range(100)),
    )
    replies = await asyncio.gather(
        *(pipe.Assign(assign(f"after{i}"), timeout=5) for i in range(50))
    )
    assert [r.book_version.rsplit("|", 1)[1] for r in replies] == [f"after{i}" for i in range(50)]
