"""Locust users of the gateway's HTTP and gRPC APIs, fed and paced by :mod:`loadtest.traffic`.

Import this module only in a load generator process: it imports locust, which patches
the standard library for gevent. The locustfiles (``loadtest/locustfile_http.py``,
``loadtest/locustfile_grpc.py``) subclass :class:`HttpShopper` / :class:`GrpcShopper` and
call :func:`install`, which adds the traffic options to locust's command line (and web UI)
and configures the classes when a test starts; ``chaos.load`` configures a subclass
itself (:func:`configure`).

Each user visits on its :class:`~loadtest.traffic.Pacer` grid: one recommendation for a
tenant and user drawn by the traffic model, then, for a share of them, a pause and a
click on a returned item. Both APIs report every call to locust's statistics (``POST
/v1/recommend`` and ``POST /v1/events``, or gRPC ``Recommend`` and ``LogEvents``) and, when
a recorder is set, write one JSON line per request (format in :mod:`loadtest.traffic`).
"""

from __future__ import annotations

# locust patches the standard library for gevent when imported: keep it first.
from locust import FastHttpUser, User, task  # isort: skip

import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
from locust.env import Environment
from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from loadtest.traffic import (
    CLICK_SHARE,
    CONNECT_TIMEOUT_S,
    PER_USER_RATE,
    REQUEST_TIMEOUT_S,
    TENANT_KEYS_DEV,
    THINK_S,
    ZIPF_EXPONENT,
    Pacer,
    Recorder,
    TenantKey,
    TrafficModel,
    Visit,
    ZipfUsers,
    click_event,
    error_kind,
    n_users_of,
    read_tenant_keys,
)
from mesh.paths import ARTIFACTS_DIR
from mesh.settings import ToolTlsSettings, load
from mesh.tls import Transport


@dataclass(frozen=True)
class Answer:
    """What one request returned, whichever API carried it."""

    status: int
    error: str
    ms: float
    request_id: str = ""
    items: tuple[str, ...] = ()
    """The answer's items, by the tenant's own ids."""
    degraded: tuple[str, ...] = ()


class Shopper:
    """The behaviour both API users share: pace, visit, click, record.

    Configured through class attributes (:func:`configure`); :meth:`recommend` and
    :meth:`click` are the API-specific halves.
    """

    model: ClassVar[TrafficModel]
    per_user_rate: ClassVar[float] = PER_USER_RATE
    recorder: ClassVar[Recorder | None] = None
    seed: ClassVar[int] = 0
    _numbers: ClassVar[itertools.count[int]] = itertools.count()

    environment: Environment
    number: int
    rng: random.Random
    pacer: Pacer

    def start_pace(self) -> None:
        """Take the next slot of the grid and sleep until it (call from ``on_start``)."""
        self.number = next(Shopper._numbers)
        runner = self.environment.runner
        slots = max(1, runner.target_user_count if runner is not None else 1)
        self.rng = random.Random(self.seed * 1_000_003 + self.number)
        self.pacer = Pacer(1.0 / self.per_user_rate, self.number, slots)
        time.sleep(self.pacer.first_delay())

    def wait_time(self) -> float:
        return self.pacer.next_delay()

    def recommend(self, visit: Visit) -> Answer:
        """Ask for ``visit``'s recommendation; failures come back in the answer, not raised."""
        raise NotImplementedError

    def click(self, tenant: TenantKey, event: dict[str, Any]) -> Answer:
        """Post ``event`` (a :func:`~loadtest.traffic.click_event`) for ``tenant``; failures
        come back in the answer, not raised."""
        raise NotImplementedError

    def visit(self) -> None:
        """One recommendation and, for a share of them, a click after thinking."""
        visit = self.model.visit(self.rng)
        started = time.time()
        answer = self.recommend(visit)
        self._record("rec", started, answer, visit.tenant)
        choice = self.model.clicked(self.rng, answer.items)
        if choice is None:
            return
        time.sleep(self.model.think(self.rng))
        position, item = choice
        event = click_event(
            self.rng, visit.user_id, item, answer.request_id, position, int(time.time() * 1000)
        )
        started = time.time()
        self._record("evt", started, self.click(visit.tenant, event), visit.tenant, event)

    def _record(
        self,
        kind: str,
        started: float,
        answer: Answer,
        tenant: TenantKey,
        event: dict[str, Any] | None = None,
    ) -> None:
        if self.recorder is None:
            return
        record: dict[str, Any] = {"k": kind, "t": round(started, 4), "ms": round(answer.ms, 2)}
        record |= {"s": answer.status, "e": answer.error, "u": self.number, "tn": tenant.name}
        if event is not None:
            record["id"] = event["event_id"]
        elif not answer.error:
            record |= {"d": list(answer.degraded), "r": answer.request_id}
            record["n"] = len(answer.items)
        self.recorder.add(record)


class HttpShopper(Shopper, FastHttpUser):
    """A client of the HTTP API (``POST /v1/recommend``, ``POST /v1/events``)."""

    abstract = True
    host = "http://127.0.0.1:8080"
    network_timeout = REQUEST_TIMEOUT_S
    connection_timeout = CONNECT_TIMEOUT_S
    max_retries = 0

    def on_start(self) -> None:
        self.start_pace()

    def _post(self, path: str, tenant: TenantKey, body: dict[str, Any]) -> tuple[Answer, Any]:
        clock = time.perf_counter()
        response = self.client.post(
            path,
            data=json.dumps(body),
            headers={"x-api-key": tenant.api_key, "content-type": "application/json"},
        )
        status = int(response.status_code or 0)
        kind = error_kind(getattr(response, "error", None), status)
        document: Any = None
        if not kind:
            try:
                document = json.loads(response.content or b"null")
            except ValueError:
                kind = "body"
        return Answer(status, kind, (time.perf_counter() - clock) * 1000.0), document

    def recommend(self, visit: Visit) -> Answer:
        body = {"user_id": visit.user_id, "num_items": visit.num_items}
        answer, document = self._post("/v1/recommend", visit.tenant, body)
        if not isinstance(document, dict):
            return answer
        return Answer(
            answer.status,
            answer.error,
            answer.ms,
            str(document.get("request_id", "")),
            tuple(str(item["item_id"]) for item in document.get("items", [])),
            tuple(document.get("degraded", [])),
        )

    def click(self, tenant: TenantKey, event: dict[str, Any]) -> Answer:
        return self._post("/v1/events", tenant, {"events": [event]})[0]

    @task
    def shop(self) -> None:
        self.visit()


class GrpcShopper(Shopper, User):
    """A client of the gRPC API (``Recommend``, ``LogEvents``); ``host`` is ``host:port``.

    The users of one process share a channel per target, as an application's backend
    would. The process must have called ``grpc.experimental.gevent.init_gevent()``
    before the first user starts.
    """

    abstract = True
    host = "127.0.0.1:50050"
    _stubs: ClassVar[dict[str, gateway_pb2_grpc.GatewayServiceStub]] = {}

    stub: gateway_pb2_grpc.GatewayServiceStub

    def on_start(self) -> None:
        target = str(self.host)
        if target not in GrpcShopper._stubs:
            # mTLS as the tools' identity (RECMESH_TLS_IDENTITY, RECMESH_TLS_DIR), or
            # plaintext with RECMESH_TLS=off, as the mesh it drives.
            transport = Transport.for_tool(load(ToolTlsSettings))
            channel = transport.sync_channel(target, server="gateway")
            GrpcShopper._stubs[target] = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.stub = GrpcShopper._stubs[target]
        self.start_pace()

    def _call(self, name: str, method: Any, request: Any, tenant: TenantKey) -> tuple[Any, Answer]:
        clock = time.perf_counter()
        reply: Any = None
        error: grpc.RpcError | None = None
        try:
            reply = method(
                request, timeout=REQUEST_TIMEOUT_S, metadata=(("x-api-key", tenant.api_key),)
            )
        except grpc.RpcError as exc:
            error = exc
        ms = (time.perf_counter() - clock) * 1000.0
        # locust's EventHook.fire is not annotated.
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type="grpc",
            name=name,
            response_time=ms,
            response_length=reply.ByteSize() if reply is not None else 0,
            exception=error,
            context={"tenant": tenant.name},
        )
        if error is None:
            return reply, Answer(200 if name == "Recommend" else 202, "", ms)
        code = error.code() if isinstance(error, grpc.Call) else None
        return None, Answer(0, code.name.lower() if code is not None else "other", ms)

    def recommend(self, visit: Visit) -> Answer:
        request = gateway_pb2.RecommendRequest(user_id=visit.user_id, num_items=visit.num_items)
        reply, answer = self._call("Recommend", self.stub.Recommend, request, visit.tenant)
        if reply is None:
            return answer
        return Answer(
            answer.status,
            "",
            answer.ms,
            reply.request_id,
            tuple(item.item_id for item in reply.items),
            tuple(reply.degraded),
        )

    def click(self, tenant: TenantKey, event: dict[str, Any]) -> Answer:
        request = gateway_pb2.LogEventsRequest(
            events=[
                gateway_pb2.ClientEvent(
                    event_id=event["event_id"],
                    type=event["type"],
                    user_id=event["user_id"],
                    item_id=event["item_id"],
                    request_id=event["request_id"],
                    ts_ms=event["ts"],
                    position=event["position"],
                )
            ]
        )
        return self._call("LogEvents", self.stub.LogEvents, request, tenant)[1]

    @task
    def shop(self) -> None:
        self.visit()


def configure(
    user_class: type[Shopper],
    model: TrafficModel,
    per_user_rate: float = PER_USER_RATE,
    recorder: Recorder | None = None,
    seed: int = 0,
) -> None:
    """Set the traffic of ``user_class`` (before its users start)."""
    user_class.model = model
    user_class.per_user_rate = per_user_rate
    user_class.recorder = recorder
    user_class.seed = seed


def add_options(parser: Any) -> None:
    """Add the traffic options to locust's parser (they show in the web UI too)."""
    parser.add_argument(
        "--artifacts",
        default=str(ARTIFACTS_DIR),
        help="artifact root; users are drawn from its current set's n_users",
    )
    parser.add_argument(
        "--tenant-keys",
        default=str(TENANT_KEYS_DEV),
        help="tenant key file: {tenants: {name: {api_key, weight}}}",
    )
    parser.add_argument(
        "--zipf", type=float, default=ZIPF_EXPONENT, help="Zipf exponent of users (0: uniform)"
    )
    parser.add_argument(
        "--click-share", type=float, default=CLICK_SHARE, help="recommendations clicked"
    )
    parser.add_argument(
        "--think-s",
        default=f"{THINK_S[0]:g},{THINK_S[1]:g}",
        help="think time before a click: low,high",
    )
    parser.add_argument(
        "--per-user-rate",
        type=float,
        default=PER_USER_RATE,
        help="recommendations/s of one user; offered rate = users x this",
    )
    parser.add_argument("--num-items", type=int, default=10, help="items per recommendation")
    parser.add_argument("--record", default="", help="JSON-lines file of every request")
    parser.add_argument("--seed", type=int, default=0, help="seed of users, tenants, clicks")


def model_from(options: Any) -> TrafficModel:
    """The traffic model of parsed :func:`add_options` options."""
    n_users, id_format = n_users_of(Path(options.artifacts))
    low, high = (float(part) for part in str(options.think_s).split(","))
    return TrafficModel(
        users=ZipfUsers(n_users, float(options.zipf), int(options.seed), id_format),
        tenants=tuple(read_tenant_keys(Path(options.tenant_keys))),
        click_share=float(options.click_share),
        think_s=(low, high),
        num_items=int(options.num_items),
    )


def install(events: Any, user_class: type[Shopper]) -> None:
    """Wire ``user_class`` to locust's command line: its options, its configuration when a
    test starts, and (with ``--record``) the last records flushed when the test stops."""

    def options(parser: Any, **_: Any) -> None:
        add_options(parser)

    def start(environment: Environment, **_: Any) -> None:
        parsed: Any = environment.parsed_options
        recorder = Recorder(Path(parsed.record)) if parsed.record else None
        configure(
            user_class, model_from(parsed), float(parsed.per_user_rate), recorder, int(parsed.seed)
        )

    def stop(**_: Any) -> None:
        if user_class.recorder is not None:
            user_class.recorder.flush()

    events.init_command_line_parser.add_listener(options)
    events.test_start.add_listener(start)
    events.test_stop.add_listener(stop)
    events.quitting.add_listener(stop)
