"""Property-based fuzzing of every gRPC method the mesh serves (issue 17).

The methods come from the generated descriptors (every service of every ``*_pb2`` module
under ``gen/``), so a new method is fuzzed as soon as its stubs are generated; the first test
fails when a server serves a service the descriptors do not declare, or a declared service
is served by no server. The library's own services (``grpc.health.v1``, reflection) are not
the mesh's code and are left out, as the server interceptor leaves them out.

Each method gets request bytes of three classes (``tests.fuzz.messages``): random bytes,
valid messages built from its descriptor (extreme values, huge fields) or varied from a seed
(a request the service accepts, :func:`seed_requests`, so that cases get past validation),
and valid messages mutated on the wire. They are sent over a plaintext ``grpc.aio`` channel
to the in-process mesh with raw bytes in and out, so bytes no message decodes from reach the
server. Every answer must be OK or a client error (:data:`CLIENT_ERRORS`), never UNKNOWN or
INTERNAL (a method may also answer as :data:`ALSO_ALLOWED` says, for the reason it gives);
an INVALID_ARGUMENT names a field of the request (or the request, or a metadata entry); no
status is lost to trailers too large for the client. Streaming methods (there are none
today) get a stream of such messages. Afterwards every server still reports SERVING and
every seed is still answered OK, so every service answers a valid call.

Bounded: ``derandomize=True`` (the same cases every run), :data:`EXAMPLES` cases per method
and input class; the run's totals are printed at the end (``tests/fuzz/conftest.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import envoy
import grpc
import pytest
import recmesh
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2
from recmesh.experiment.v1 import experiment_pb2
from recmesh.feature.v1 import feature_pb2
from recmesh.gateway.v1 import gateway_pb2
from recmesh.mesh.v1 import pipe_pb2
from recmesh.quota.v1 import quota_pb2
from recmesh.ranking.v1 import ranking_pb2
from recmesh.retrieval.v1 import retrieval_pb2

from core.artifacts import load_artifact_set, resolve_current
from core.events import EVENT_TYPES
from mesh.context import API_KEY, TENANT_KEY
from tests.fuzz import tally
from tests.fuzz.messages import KINDS, Vocabulary, one_huge_field, request_bytes
from tests.inprocess import PROJECT, Mesh, inprocess_mesh, write_tenants

TENANT, KEY = "fuzz", "fuzz-key"
"""The tenant the fuzz acts as (its own, so what it writes touches no other test's data)."""

METADATA = ((TENANT_KEY, TENANT), (API_KEY, KEY))
"""Every call carries both: the tenant for internal services, the API key for the gateway."""

FIELD_TRAILER = "x-recmesh-field"
"""The trailer naming the request field an INVALID_ARGUMENT blames (``mesh.server``)."""

EXAMPLES = int(os.environ.get("RECMESH_FUZZ_EXAMPLES", "30"))
"""Cases per method and input class (fewer when a request type has fewer distinct values);
``RECMESH_FUZZ_EXAMPLES`` asks for a deeper run (the figures in docs/security.md)."""

MAX_REQUEST_BYTES = 3 << 20
"""Budget of a ``valid`` request: under the servers' largest accepted message (4 MiB)."""

CALL_TIMEOUT_S = 10.0
"""A call not answered by then is a hang: the test fails with DEADLINE_EXCEEDED."""

CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
"""What any fuzzed call may be answered: OK or a status that blames the request."""

ALSO_ALLOWED: dict[str, tuple[frozenset[grpc.StatusCode], str]] = {}
"""Method full name -> the other statuses (DEADLINE_EXCEEDED, UNAVAILABLE) it may answer,
and why (e.g. a deliberate fallback). None needs one today."""


def declared_services() -> dict[str, ServiceDescriptor]:
    """Every service of every generated ``*_pb2`` module under ``gen/``, by full name."""
    services: dict[str, ServiceDescriptor] = {}
    for package in (recmesh, envoy):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith("_pb2"):
                module = importlib.import_module(info.name)
                services.update(
                    (s.full_name, s) for s in module.DESCRIPTOR.services_by_name.values()
                )
    return dict(sorted(services.items()))


SERVICES = declared_services()
TARGETS = [method for service in SERVICES.values() for method in service.methods]


def _method_id(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """The in-process mesh with a tenant of the fuzz's own, with room for its calls."""
    tenants = write_tenants(
        tmp_path_factory.mktemp("fuzz") / "tenants.json", {TENANT: (KEY, 100_000.0, 1_000_000)}
    )
    async with inprocess_mesh(redis_url, artifacts_root, tenants) as running:
        yield running


@pytest.fixture(scope="module")
async def routes(mesh: Mesh) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    """Service full name -> a raw channel to the server serving it, from each server's
    reflection (what is served on the wire, the library's ``grpc.*`` services left out)."""
    channels: list[grpc.aio.Channel] = []
    served: dict[str, grpc.aio.Channel] = {}
    for name in mesh.servers:
        channel = grpc.aio.insecure_channel(
            mesh.addr(name), options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        channels.append(channel)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([ask]), timeout=CALL_TIMEOUT_S):
            for service in reply.list_services_response.service:
                if not service.name.startswith("grpc."):
                    served[service.name] = channel
    yield served
    for channel in channels:
        await channel.close()


@pytest.fixture(scope="module")
def vocabulary(artifacts_root: Path) -> Vocabulary:
    """Words and vector lengths the mesh gives a meaning to (``tests.fuzz.messages``)."""
    config = load_artifact_set(resolve_current(artifacts_root)).config
    book = json.loads((PROJECT / "config" / "experiments.json").read_text())
    return Vocabulary(
        words=[
            TENANT,
            "tenant",
            "recmesh",  # the quota service's rate-limit domain
            "u1",
            "u2",
            "1",
            "5",
            "1999",
            "1700000000000-0",
            *sorted(EVENT_TYPES),
            *(experiment["key"] for experiment in book["experiments"]),
        ],
        vector_lengths=[config["user_feature_dim"], config["item_feature_dim"]],
    )


def _identity(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Answer:
    """How a call ended: its status, the status's details, and the request field the
    server blamed (the ``x-recmesh-field`` trailer, ``mesh.server.abort_with``)."""

    code: grpc.StatusCode
    details: str = ""
    field: str = ""


async def send(
    channel: grpc.aio.Channel, method: MethodDescriptor, requests: list[bytes]
) -> Answer:
    """Send ``requests`` (one, or a stream) as they are; how the call ended."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    raw = {"request_serializer": _identity, "response_deserializer": _identity}
    replies: list[bytes] = []
    try:
        if method.client_streaming and method.server_streaming:
            stream_stream = channel.stream_stream(path, **raw)
            both = stream_stream(iter(requests), metadata=METADATA, timeout=CALL_TIMEOUT_S)
            replies = [reply async for reply in both]
        elif method.client_streaming:
            stream_unary = channel.stream_unary(path, **raw)
            reply = await stream_unary(iter(requests), metadata=METADATA, timeout=CALL_TIMEOUT_S)
            replies = [reply]
        elif method.server_streaming:
            unary_stream = channel.unary_stream(path, **raw)
            answers = unary_stream(requests[0], metadata=METADATA, timeout=CALL_TIMEOUT_S)
            replies = [reply async for reply in answers]
        else:
            unary_unary = channel.unary_unary(path, **raw)
            replies = [await unary_unary(requests[0], metadata=METADATA, timeout=CALL_TIMEOUT_S)]
    except grpc.aio.AioRpcError as exc:
        trailers = dict(exc.trailing_metadata() or ())
        return Answer(exc.code(), exc.details() or "", str(trailers.get(FIELD_TRAILER, "")))
    reply_type = GetMessageClass(method.output_type)
    for reply in replies:
        reply_type.FromString(reply)  # every answer is a message of the declared type
    return Answer(grpc.StatusCode.OK)


def test_every_served_method_is_fuzzed() -> None:
    """Collection-time check: there is something to fuzz (the served set is checked by
    :func:`test_the_mesh_serves_exactly_the_declared_services`)."""
    assert TARGETS
    assert len({m.full_name for m in TARGETS}) == len(TARGETS)


async def test_the_mesh_serves_exactly_the_declared_services(
    routes: dict[str, grpc.aio.Channel],
) -> None:
    """Every service a server serves is declared in ``gen/`` (so its methods are fuzzed),
    and every declared service is served."""
    assert sorted(routes) == sorted(SERVICES)


def seed_requests(user_dim: int, item_dim: int) -> dict[str, list[Message]]:
    """Method full name -> requests its service accepts (answered OK): varied and mutated by
    the fuzz so that some cases get past validation. Optional per method (one without seeds
    is fuzzed from its descriptor alone); at least one per service, so that the check after
    the fuzz makes a valid call to each."""
    ms = int(time.time() * 1000)
    user = struct.pack(f"<{user_dim}f", *([0.1] * user_dim))
    item = struct.pack(f"<{item_dim}f", *([0.2] * item_dim))
    ids = list(range(1, 41))
    candidates = common_pb2.Candidates(
        item_ids=ids, scores=[1.0 / i for i in ids], sources=[common_pb2.SOURCE_ANN] * len(ids)
    )
    tenant = ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant", value=TENANT)
    click = events_pb2.Event(
        event_id="fuzz-e1", type="click", user_id="u1", item_id=3, ts_ms=ms, request_id="r1"
    )
    impression = events_pb2.Event(
        event_id="fuzz-e2",
        type="impression",
        user_id="u1",
        item_id=3,
        ts_ms=ms,
        position=1,
        propensity=0.5,
        support=[3, 4, 5],
        attributes={"page": "home"},
        variants={"retrieval-k": "control"},
    )
    upsert = events_pb2.Event(
        event_id="fuzz-e3", type="item_upsert", item_ref="fuzz-item", ts_ms=ms, features=item
    )
    seeds: dict[str, list[Message]] = {
        "recmesh.gateway.v1.GatewayService.Recommend": [
            gateway_pb2.RecommendRequest(user_id="u1", num_items=5, debug=True),
            gateway_pb2.RecommendRequest(user_id="u2", context={"page": "home"}),
        ],
        "recmesh.gateway.v1.GatewayService.LogEvents": [
            gateway_pb2.LogEventsRequest(
                events=[
                    gateway_pb2.ClientEvent(
                        event_id="fuzz-g1", type="click", user_id="u1", item_id="3", ts_ms=ms
                    )
                ]
            )
        ],
        "recmesh.gateway.v1.GatewayService.UpsertItems": [
            gateway_pb2.UpsertItemsRequest(
                items=[
                    gateway_pb2.CatalogItem(
                        item_id="fuzz-item", category=1, features=[0.2] * item_dim
                    )
                ]
            )
        ],
        "recmesh.gateway.v1.GatewayService.DeleteItems": [
            gateway_pb2.DeleteItemsRequest(item_ids=["fuzz-gone"])
        ],
        "recmesh.gateway.v1.GatewayService.EraseUser": [
            gateway_pb2.EraseUserRequest(user_id="fuzz-u8")
        ],
        "recmesh.quota.v1.QuotaService.Acquire": [
            quota_pb2.AcquireRequest(cost=1),
            quota_pb2.AcquireRequest(tenant=TENANT, cost=1, max_cost=5),
            quota_pb2.AcquireRequest(cost=2, check_only=True),
        ],
        "recmesh.quota.v1.QuotaService.GetUsage": [quota_pb2.GetUsageRequest(tenant=TENANT)],
        "recmesh.quota.v1.QuotaService.RecordUsage": [
            quota_pb2.RecordUsageRequest(
                batch_id="fuzz-b1",
                costs=[
                    quota_pb2.TenantCost(
                        tenant=TENANT,
                        requests=2,
                        cpu_us={"retrieval": 100, "ranking": 200},
                        candidates_scored={"prerank": 40, "heavy": 20},
                    )
                ],
            )
        ],
        "envoy.service.ratelimit.v3.RateLimitService.ShouldRateLimit": [
            rls_pb2.RateLimitRequest(
                domain="recmesh",
                descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[tenant])],
                hits_addend=1,
            )
        ],
        "recmesh.experiment.v1.ExperimentService.Assign": [
            experiment_pb2.AssignRequest(user_id="u1", attributes={"country": "de"})
        ],
        # A pipe's stream is answered OK whatever its calls answer (each answer carries its
        # own status); the seed is a call every service's pipe routes (UNIMPLEMENTED where
        # the method is not served), so mutations of it reach the dispatch.
        "recmesh.mesh.v1.PipeService.Exchange": [
            pipe_pb2.ExchangeRequest(
                id=1,
                method="/recmesh.experiment.v1.ExperimentService/Assign",
                payload=experiment_pb2.AssignRequest(user_id="u1").SerializeToString(),
                timeout_s=1.0,
                metadata={TENANT_KEY: TENANT},
            )
        ],
        "recmesh.experiment.v1.ExperimentService.GetReport": [
            experiment_pb2.GetReportRequest(experiment_key="retrieval-k")
        ],
        "recmesh.feature.v1.FeatureService.GetUserFeatures": [
            feature_pb2.GetUserFeaturesRequest(user_id="u1", history_limit=5)
        ],
        "recmesh.feature.v1.FeatureService.GetItemFeatures": [
            feature_pb2.GetItemFeaturesRequest(item_ids=[1, 2, 3], counter_item_ids=[1, 2])
        ],
        "recmesh.feature.v1.FeatureService.GetTrendingItems": [
            feature_pb2.GetTrendingItemsRequest(k=10)
        ],
        "recmesh.feature.v1.FeatureService.WriteUserFeatures": [
            feature_pb2.WriteUserFeaturesRequest(
                users=[feature_pb2.UserRow(user_id="fuzz-u1", features=user, history=[1, 2])]
            )
        ],
        "recmesh.feature.v1.FeatureService.WriteItemFeatures": [
            feature_pb2.WriteItemFeaturesRequest(
                item_ids=[7],
                features=common_pb2.FeatureMatrix(rows=1, dim=item_dim, values=item),
                categories=[1],
            )
        ],
        "recmesh.feature.v1.FeatureService.GetItemChanges": [
            feature_pb2.GetItemChangesRequest(since_ms=0, limit=10, with_state=True)
        ],
        "recmesh.retrieval.v1.RetrievalService.Retrieve": [
            retrieval_pb2.RetrieveRequest(user_id="u1", ann_k=20, trending_k=5, popular_k=5)
        ],
        "recmesh.ranking.v1.RankingService.Rank": [
            ranking_pb2.RankRequest(
                user_id="u1", user_features=user, candidates=candidates, num_items=10
            ),
            ranking_pb2.RankRequest(
                user_id="u2",
                candidates=candidates,
                num_items=5,
                diversity=ranking_pb2.DIVERSITY_MMR,
                mmr_lambda=0.5,
                explore_share=0.2,
            ),
            ranking_pb2.RankRequest(
                user_id="u3",
                candidates=candidates,
                interleave=ranking_pb2.Interleave(
                    a=ranking_pb2.RankerArm(key="a", heavy_mode=ranking_pb2.HEAVY_MODE_ON),
                    b=ranking_pb2.RankerArm(key="b", heavy_mode=ranking_pb2.HEAVY_MODE_OFF),
                ),
            ),
        ],
        "recmesh.events.v1.EventService.Append": [
            events_pb2.AppendRequest(events=[click, impression]),
            events_pb2.AppendRequest(events=[upsert]),
        ],
        "recmesh.events.v1.EventService.Read": [events_pb2.ReadRequest(after="0-0", limit=10)],
        "recmesh.events.v1.EventService.ReadRequestEvents": [
            events_pb2.ReadRequestEventsRequest(request_id="r1")
        ],
        "recmesh.events.v1.EventService.ReadUserEvents": [
            events_pb2.ReadUserEventsRequest(user_id="u1", limit=10)
        ],
        "recmesh.events.v1.EventService.EraseUser": [
            events_pb2.EraseUserRequest(user_id="fuzz-u9", requested_by="fuzz")
        ],
    }
    return seeds


@pytest.fixture(scope="module")
def seeds(artifacts_root: Path) -> dict[str, list[Message]]:
    config = load_artifact_set(resolve_current(artifacts_root)).config
    return seed_requests(config["user_feature_dim"], config["item_feature_dim"])


async def _seeds_answered(
    routes: dict[str, grpc.aio.Channel], seeds: dict[str, list[Message]]
) -> None:
    methods = {m.full_name: m for m in TARGETS}
    for name, requests in seeds.items():
        method = methods[name]
        for request in requests:
            wire = request.SerializeToString()
            answer = await send(routes[method.containing_service.full_name], method, [wire])
            assert answer.code == grpc.StatusCode.OK, f"{name}: {answer}"


async def test_seeds_are_answered_ok(
    routes: dict[str, grpc.aio.Channel], seeds: dict[str, list[Message]]
) -> None:
    """The seeds are valid requests (so varying them reaches past validation), and each
    service has one."""
    assert {name.rsplit(".", 1)[0] for name in seeds} == set(SERVICES)
    await _seeds_answered(routes, seeds)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", TARGETS, ids=_method_id)
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(data=st.data())
async def test_fuzzed_requests_get_ok_or_a_client_error(
    routes: dict[str, grpc.aio.Channel],
    vocabulary: Vocabulary,
    seeds: dict[str, list[Message]],
    method: MethodDescriptor,
    kind: str,
    data: st.DataObject,
) -> None:
    """One case: ``method`` gets drawn bytes of input class ``kind`` and answers OK or a
    client error that names what it blames."""
    payload = request_bytes(
        kind,
        method.input_type,
        vocabulary,
        max_bytes=MAX_REQUEST_BYTES,
        seeds=seeds.get(method.full_name, ()),
    )
    streaming = method.client_streaming or method.server_streaming
    requests = data.draw(st.lists(payload, max_size=8)) if streaming else [data.draw(payload)]
    answer = await send(routes[method.containing_service.full_name], method, requests)
    code, details = answer.code, answer.details
    tally.record(method.full_name, kind, code.name)
    allowed = CLIENT_ERRORS | ALSO_ALLOWED.get(method.full_name, (frozenset(), ""))[0]
    assert code in allowed, f"{method.full_name} ({kind}) answered {code.name}: {details}"
    # The client's own RESOURCE_EXHAUSTED when the answer's trailers were too large to read:
    # the server's status was lost (error messages must stay short, mesh.errors).
    assert "metadata size exceeds" not in details, f"{method.full_name} ({kind}): {details}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        blamed = answer.field.split(".", 1)[0].split("[", 1)[0]
        known = {"request", TENANT_KEY, API_KEY, *method.input_type.fields_by_name}
        assert blamed in known, f"{method.full_name} ({kind}) blames {answer.field!r}: {details}"


@pytest.mark.parametrize("method", TARGETS, ids=_method_id)
async def test_a_megabyte_in_any_text_field_gets_a_readable_client_error(
    routes: dict[str, grpc.aio.Channel],
    seeds: dict[str, list[Message]],
    method: MethodDescriptor,
) -> None:
    """Every string and bytes field, one at a time, at 1 MiB, in an empty request and in
    each seed: the answer is OK or a client error the caller can read (error messages quote
    request values: mesh.errors clips them). The hypothesis cases draw huge values too, in
    some cases; this covers every field, every run."""
    empty = GetMessageClass(method.input_type)()
    for base in [empty, *seeds.get(method.full_name, ())]:
        for path, request in one_huge_field(base):
            wire = request.SerializeToString()
            answer = await send(routes[method.containing_service.full_name], method, [wire])
            tally.record(method.full_name, "huge-field", answer.code.name)
            assert answer.code in CLIENT_ERRORS, f"{method.full_name} {path}: {answer}"
            assert "metadata size exceeds" not in answer.details, f"{method.full_name} {path}"


async def test_every_server_still_serves_after_the_fuzz(
    mesh: Mesh, routes: dict[str, grpc.aio.Channel], seeds: dict[str, list[Message]]
) -> None:
    """Runs after the fuzz (pytest keeps the file's order): every server reports SERVING,
    and every service still answers its seeds."""
    for name in mesh.servers:
        async with grpc.aio.insecure_channel(mesh.addr(name)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    await _seeds_answered(routes, seeds)
