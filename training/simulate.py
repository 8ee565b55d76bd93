"""A simulated serve: the synthetic world's users shown an artifact set's answers, their
clicks and conversions drawn from the world's ground truth, written to a tenant's event log.

It stands in for traffic on the mesh when no real users click, so that the flywheel (serve,
log, train from the log, serve) can be run and measured end to end. :func:`simulate_serve`
builds the events; :func:`append_events` writes them through the events service, the log's
one writer (idempotent by event id: the same run appended twice stores nothing new).

Each request (``gap_ms`` apart) picks a world user uniformly; a share ``unknown_share`` of
requests comes under an id the set does not know (``guest<row>``: the user's ground truth,
the set's default row). The answer draws ``candidates`` items uniformly, orders them by the
set's ranker (ONNX, weighted by the set's ``ranker_head_weights``) and shows the best
``slate - explore_slots`` (source ``ANN``, propensity 1: the order is deterministic)
followed by ``explore_slots`` items drawn uniformly from the rest of the catalogue (source
``EXPLORE``, propensity ``explore_slots / (n_items - shown)``). Each shown item is clicked,
and a click converted, with the world's probabilities; a click comes ``click_delay_ms`` after
its answer and a conversion as long again after the click. The events are returned in
event-time order, which is the order the log gets them: clicks land among the impressions
of later answers, as in a live log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import onnxruntime as ort
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.artifacts import ArtifactSet
from mesh.context import TENANT_KEY
from training.world import World

CHUNK = 256
"""Requests scored by the ranker per ONNX call."""


@dataclass(frozen=True)
class ServeConfig:
    """Shape of a simulated serve (see the module docstring)."""

    requests: int = 20000
    slate: int = 10
    candidates: int = 100
    explore_slots: int = 1
    unknown_share: float = 0.05
    gap_ms: int = 100
    click_delay_ms: tuple[int, int] = (1000, 60000)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.explore_slots < self.slate <= self.candidates:
            raise ValueError("need 0 <= explore_slots < slate <= candidates")
        if not 0.0 <= self.unknown_share <= 1.0:
            raise ValueError("unknown_share must be in [0, 1]")


def simulate_serve(
    artifact_set: ArtifactSet, world: World, config: ServeConfig, start_ms: int
) -> list[events_pb2.Event]:
    """The events of ``config.requests`` answers of ``artifact_set`` to ``world``'s users,
    the first at ``start_ms``, in event-time order (see the module docstring)."""
    rng = np.random.default_rng(config.seed)
    n_items = world.config.n_items
    if n_items < config.candidates + config.explore_slots:
        raise ValueError("the world has fewer items than candidates plus exploration slots")
    users = np.asarray(artifact_set.open_array("user_features"), dtype=np.float32)
    item_x = np.asarray(artifact_set.open_array("item_features"), dtype=np.float32)
    default = users.mean(axis=0, dtype=np.float64).astype(np.float32)
    session = ort.InferenceSession(
        str(artifact_set.file("ranker")), providers=["CPUExecutionProvider"]
    )
    heads = [str(h) for h in artifact_set.config["ranker_heads"]]
    weighting = artifact_set.config.get("ranker_head_weights", {})
    weights = np.array([float(weighting.get(h, 1.0)) for h in heads], dtype=np.float32)
    version = artifact_set.version
    shown_slots = config.slate - config.explore_slots

    truth_rows = rng.integers(0, world.config.n_users, size=config.requests)
    unknown = rng.random(config.requests) < config.unknown_share
    shown = np.empty((config.requests, config.slate), dtype=np.int64)
    scores = np.zeros((config.requests, config.slate), dtype=np.float32)
    for start in range(0, config.requests, CHUNK):
        stop = min(start + CHUNK, config.requests)
        count = stop - start
        cands = np.stack(
            [rng.choice(n_items, size=config.candidates, replace=False) for _ in range(count)]
        )
        served = np.where(unknown[start:stop, None], default, users[truth_rows[start:stop]])
        user_x = np.repeat(served.astype(np.float32), config.candidates, axis=0)
        out = session.run(None, {"user_features": user_x, "item_features": item_x[cands.ravel()]})
        score = (np.asarray(out[0]) @ weights).reshape(count, config.candidates)
        best = np.argsort(-score, axis=1, kind="stable")[:, :shown_slots]
        shown[start:stop, :shown_slots] = np.take_along_axis(cands, best, axis=1)
        scores[start:stop, :shown_slots] = np.take_along_axis(score, best, axis=1)
        for r in range(count):
            taken = set(shown[start + r, :shown_slots].tolist())
            extra: list[int] = []
            while len(extra) < config.explore_slots:
                item = int(rng.integers(0, n_items))
                if item not in taken:
                    taken.add(item)
                    extra.append(item)
            shown[start + r, shown_slots:] = extra

    pair_users = truth_rows.repeat(config.slate)
    clicked, converted = world.simulate(pair_users, shown.ravel(), seed=config.seed + 1)
    delays = rng.integers(*config.click_delay_ms, size=(config.requests * config.slate, 2))
    explore_propensity = config.explore_slots / (n_items - shown_slots)
    timed: list[tuple[int, int, events_pb2.Event]] = []
    for k in range(config.requests):
        at = start_ms + k * config.gap_ms
        user = f"guest{truth_rows[k]}" if unknown[k] else f"u{truth_rows[k]}"
        request = f"sim{config.seed}-r{k}"
        for slot in range(config.slate):
            flat = k * config.slate + slot
            item = int(shown[k, slot])
            explored = slot >= shown_slots
            timed.append(
                (
                    at,
                    len(timed),
                    events_pb2.Event(
                        event_id=f"{request}-{slot}-i",
                        type="impression",
                        user_id=user,
                        item_id=item,
                        request_id=request,
                        ts_ms=at,
                        position=slot,
                        propensity=explore_propensity if explored else 1.0,
                        score=float(scores[k, slot]),
                        source=common_pb2.SOURCE_EXPLORE if explored else common_pb2.SOURCE_ANN,
                        retrieval_version=version,
                        ranking_version=version,
                    ),
                )
            )
            if not clicked[flat]:
                continue
            click_at = at + int(delays[flat, 0])
            kinds = [("click", click_at)]
            if converted[flat]:
                kinds.append(("conversion", click_at + int(delays[flat, 1])))
            for kind, ts in kinds:
                timed.append(
                    (
                        ts,
                        len(timed),
                        events_pb2.Event(
                            event_id=f"{request}-{slot}-{kind[:2]}",
                            type=kind,
                            user_id=user,
                            item_id=item,
                            request_id=request,
                            ts_ms=ts,
                        ),
                    )
                )
    timed.sort(key=lambda t: (t[0], t[1]))
    return [event for _, _, event in timed]


def append_events(
    address: str,
    tenant: str,
    events: Sequence[events_pb2.Event],
    batch: int = 500,
    timeout_s: float = 10.0,
) -> tuple[int, int]:
    """Append ``events`` in order to ``tenant``'s log through the events service at
    ``address``, ``batch`` per ``Append``; returns (appended, duplicates).

    Raises:
        grpc.RpcError: the service refused a batch or could not be reached.
    """
    appended = duplicates = 0
    with grpc.insecure_channel(address) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for start in range(0, len(events), batch):
            reply = stub.Append(
                events_pb2.AppendRequest(events=events[start : start + batch]),
                metadata=((TENANT_KEY, tenant),),
                timeout=timeout_s,
            )
            appended += reply.appended
            duplicates += reply.duplicates
    return appended, duplicates
