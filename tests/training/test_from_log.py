"""``train --from-log``: a ranker trained on a tenant's logged impressions and outcomes.

The log is filled through the real events service (on the real Valkey) with a simulated
serve of the tiny set (its world's ground truth decides the clicks), plus a hand-made
answer sequence where a naive join would leak labels into the history.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from recmesh.events.v1 import events_pb2

from core import keys
from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from core.replay import Replay, Stored
from mesh import redis as mesh_redis
from mesh.errors import FailedPrecondition
from mesh.redis import BlockingRedis
from mesh.testing import built_server, serving
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings
from services.projector import batch
from services.ranking.models import RankingModels
from training import from_log
from training.__main__ import main
from training.from_log import FromLogConfig, train_from_log, train_on_examples
from training.log_data import LogExamples, build_examples, read_examples, read_log
from training.pipeline import world_of
from training.simulate import ServeConfig, append_events, simulate_serve

CAP = 200
SERVE = ServeConfig(requests=1500, slate=10, candidates=100, explore_slots=2, seed=3)


@dataclass(frozen=True)
class Log:
    tenant: str
    events: list[events_pb2.Event]
    """Everything appended, in order (the simulated serve, then the hand-made answers)."""
    entries: list[Stored]
    """The log as stored."""


@pytest.fixture(scope="module")
async def events_address(redis_url: str) -> AsyncIterator[str]:
    server = await built_server(build_events, EventsSettings(port=0, redis_url=redis_url))
    async with serving(server):
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[BlockingRedis]:
    connection = mesh_redis.blocking_client(redis_url)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def base(tiny_root: Path) -> ArtifactSet:
    return load_artifact_set(resolve_current(tiny_root))


def event(
    event_id: str, kind: str, request: str, item: int, ts_ms: int, **extra: object
) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=event_id,
        type=kind,
        user_id="leaky",
        item_id=item,
        request_id=request,
        ts_ms=ts_ms,
        **extra,  # type: ignore[arg-type]
    )


def leak_case(now: int) -> list[events_pb2.Event]:
    """Three answers to one user, in append order, where joining outcomes to impressions
    by event time, or by user alone, or as of append time without minding the request,
    would put a label into a history: r2's click on 14 says it happened before r2 was
    logged (a clock behind), r3's click on 15 is logged before r3's impressions (they
    waited in the outbox)."""
    t = now - 60_000
    return [
        event("lk-1", "impression", "r1", 11, t, position=0, propensity=1.0),
        event("lk-2", "impression", "r1", 12, t, position=1, propensity=0.25),
        event("lk-3", "click", "r1", 12, t + 1000),
        event("lk-3", "click", "r1", 12, t + 1000),  # the same event again
        event("lk-4", "impression", "r2", 13, t + 2000, position=0, propensity=1.0),
        event("lk-5", "impression", "r2", 14, t + 2000, position=1, propensity=1.0),
        event("lk-6", "click", "r2", 14, t + 1500),  # event time before r2's impressions
        event("lk-7", "click", "r3", 15, t + 3500),  # before r3's impressions are logged
        event("lk-8", "impression", "r3", 15, t + 3000, position=0, propensity=1.0),
        event("lk-9", "impression", "r3", 16, t + 3000, position=1, propensity=1.0),
        event("lk-10", "conversion", "r1", 12, t + 5000),
        event("lk-11", "click", "r2", 99, t + 5000),  # names r2, but an item it did not show
        event("lk-12", "click", "", 13, t + 6000),  # names no answer
    ]


@pytest.fixture(scope="module")
async def log(base: ArtifactSet, events_address: str, client: BlockingRedis) -> Log:
    tenant = "fl" + uuid.uuid4().hex[:8]
    world, _ = world_of(base)
    now = int(time.time() * 1000)
    served = simulate_serve(base, world, SERVE, now - 3_600_000)
    events = [*served, *leak_case(now)]
    appended, duplicates = await asyncio.to_thread(append_events, events_address, tenant, events)
    assert (appended, duplicates) == (len(events) - 1, 1)
    return Log(tenant, events, list(read_log(client, tenant, page=700)))


@pytest.fixture(scope="module")
def examples(log: Log, base: ArtifactSet) -> LogExamples:
    return build_examples(
        log.entries,
        tenant=log.tenant,
        n_users=int(base.open_array("user_features").shape[0]),
        item_categories=base.open_array("item_categories"),
        history_cap=CAP,
    )


def by_pair(examples: LogExamples) -> dict[tuple[str, int], int]:
    return {
        (r, int(i)): k
        for k, (r, i) in enumerate(zip(examples.request_ids, examples.items, strict=True))
    }


def test_histories_are_as_of_the_impression_and_labels_join_by_request_and_item(
    examples: LogExamples,
) -> None:
    at = by_pair(examples)
    history = {pair: examples.history(at[pair]) for pair in at if pair[0] in ("r1", "r2", "r3")}
    labels = {pair: examples.labels[at[pair]].tolist() for pair in history}
    assert history == {
        ("r1", 11): [],
        ("r1", 12): [],
        ("r2", 13): [12],  # not 14: its click was logged after r2's impressions
        ("r2", 14): [12],
        ("r3", 15): [12, 14],  # not 15: r3's own click, though logged before its impressions
        ("r3", 16): [12, 14],
    }
    assert labels == {
        ("r1", 11): [0.0, 0.0],
        ("r1", 12): [1.0, 1.0],  # clicked, and converted later in the log
        ("r2", 13): [0.0, 0.0],
        ("r2", 14): [1.0, 0.0],
        ("r3", 15): [1.0, 0.0],  # the click logged before the impression still labels it
        ("r3", 16): [0.0, 0.0],
    }
    assert examples.propensities[at[("r1", 12)]] == pytest.approx(0.25)
    assert examples.user_rows[at[("r1", 12)]] == -1  # "leaky" is not a user of the set
    counts = examples.counts
    assert counts.unmatched_outcomes == 2 and counts.outcomes_before_impression == 1
    assert counts.not_applied == 0  # the events service stored the repeated click once


def test_no_history_holds_an_outcome_appended_after_its_impression(
    log: Log, examples: LogExamples
) -> None:
    """Every example's history, recomputed by brute force from the stored log: the user's
    outcomes appended before the impression, other answers' only, newest last, capped."""
    seen: set[str] = set()
    outcomes: dict[str, list[tuple[int, str, int]]] = {}  # user -> (entry, request, item)
    index = {}
    for n, (position, stored) in enumerate(log.entries):
        index[position] = n
        assert stored is not None
        if stored.type in ("click", "conversion") and stored.event_id not in seen:
            outcomes.setdefault(stored.user_id, []).append((n, stored.request_id, stored.item_id))
        seen.add(stored.event_id)
    later_clicks = 0
    for k in range(len(examples)):
        n, request = index[examples.log_positions[k]], examples.request_ids[k]
        own = outcomes.get(examples.user_ids[k], [])
        want = [i for m, r, i in own if m < n and r != request][-CAP:]
        assert examples.history(k) == want
        later_clicks += sum(1 for m, _, _ in own if m > n)
    assert later_clicks > 1000  # the simulated users click on after most impressions


def test_labels_are_the_simulated_outcomes(log: Log, examples: LogExamples) -> None:
    clicked = {(e.request_id, e.item_id) for e in log.events if e.type == "click"}
    converted = {(e.request_id, e.item_id) for e in log.events if e.type == "conversion"}
    pairs = list(zip(examples.request_ids, examples.items.tolist(), strict=True))
    assert len(pairs) == sum(1 for e in log.events if e.type == "impression")
    assert examples.labels[:, 0].tolist() == [float(p in clicked) for p in pairs]
    assert examples.labels[:, 1].tolist() == [float(p in converted) for p in pairs]
    assert 0.1 < examples.labels[:, 0].mean() < 0.6


def test_train_from_log_writes_a_set_that_serves_and_learnt_the_clicks(
    log: Log,
    base: ArtifactSet,
    tiny_root: Path,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "artifacts"
    argv = ["train", "--from-log", "--tenant", log.tenant, "--redis-url", redis_url]
    argv += ["--root", str(root), "--base", str(base.path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    built = load_artifact_set(resolve_current(root), verify=True)
    assert built.version in out and log.tenant in out
    lineage = built.config["from_log"]
    impressions = sum(1 for e in log.events if e.type == "impression")
    assert lineage["tenant"] == log.tenant and lineage["base_version"] == base.version
    assert (lineage["first_position"], lineage["last_position"]) == (
        log.entries[0][0],
        log.entries[-1][0],
    )
    assert lineage["entries"] == len(log.entries) and lineage["impressions"] == impressions
    assert sum(lineage["examples"].values()) == impressions
    assert lineage["positives"]["train"]["click"] > 0
    assert lineage["positives"]["heldout"]["click"] > 0
    metrics = built.metrics
    # learnt something real: the held-out clicks, ordered by the ranker trained on the log
    assert metrics["log.auc.click"] > 0.65
    assert metrics["log.base_auc.click"] > 0.5
    for name in ("user_tower", "item_embeddings", "user_features", "prerank"):
        assert built.manifest["files"][name] == base.manifest["files"][name]
    assert built.manifest["files"]["ranker"] != base.manifest["files"]["ranker"]
    print(json.dumps(metrics))

    served = RankingModels(base.path, "click=1,conversion=1")
    models = RankingModels.replacing(built.path, served, "click=1,conversion=1", warm_rows=8)
    users = base.open_array("user_features")[:4]
    items = base.open_array("item_features")[:4]
    scores = np.asarray(
        models.ranker.run(
            None, {"user_features": np.asarray(users), "item_features": np.asarray(items)}
        )[0]
    )
    assert scores.shape == (4, 2) and np.all((scores >= 0) & (scores <= 1))
    assert np.all(scores[:, 1] <= scores[:, 0] + 1e-6)


def test_a_log_too_short_or_without_clicks_is_refused(
    base: ArtifactSet,
    client: BlockingRedis,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = "fl" + uuid.uuid4().hex[:8]
    with pytest.raises(FailedPrecondition, match="0 usable impressions"):
        train_from_log(tmp_path, base, client, FromLogConfig(tenant=empty, progress=False))
    argv = ["train", "--from-log", "--tenant", empty, "--redis-url", redis_url]
    argv += ["--root", str(tmp_path), "--base", str(base.path)]
    assert main(argv) == 1
    assert "needs at least 1000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--items", "50"])  # the world is the base set's
    now = int(time.time() * 1000)
    entries: list[Stored] = [
        (f"{now}-{n}", event(f"e{n}", "impression", f"q{n // 10}", n, now, position=n % 10))
        for n in range(50)
    ]
    entries += [(f"{now}-50", None), (f"{now}-51", entries[0][1])]  # not an event; a repeat
    quiet = build_examples(
        entries,
        tenant="quiet",
        n_users=10,
        item_categories=base.open_array("item_categories"),
        history_cap=CAP,
    )
    assert (len(quiet), quiet.counts.not_applied) == (50, 2)
    with pytest.raises(FailedPrecondition, match="no click among the 40 training impressions"):
        train_on_examples(tmp_path, base, quiet, FromLogConfig(min_impressions=10, progress=False))
    assert not list(tmp_path.iterdir())


async def test_a_trimmed_log_is_read_from_its_snapshot(
    base: ArtifactSet, events_address: str, client: BlockingRedis, redis_url: str
) -> None:
    """Retention trimmed the click on 21 away: the history of a later impression still has
    it, from the snapshot the trim left, and only impressions after the snapshot count."""
    tenant = "fl" + uuid.uuid4().hex[:8]
    now = int(time.time() * 1000)
    early = [
        event("t1", "impression", "a", 21, now - 9000, position=0),
        event("t2", "click", "a", 21, now - 8000),
    ]
    await asyncio.to_thread(append_events, events_address, tenant, early)
    stored = list(read_log(client, tenant))
    replay = Replay(3600.0, CAP, {})
    projected = replay.apply_all(stored)
    connection = mesh_redis.client(redis_url)
    try:  # what retention does: a snapshot marked as the trim point, then XTRIM
        assert await batch.store_snapshot(connection, tenant, projected, None, projected.position)
    finally:
        await connection.aclose()
    millis, _, seq = projected.position.partition("-")
    client.xtrim(keys.events(tenant), minid=f"{millis}-{int(seq) + 1}", approximate=False)
    later = [event("t3", "impression", "b", 22, now - 1000, position=0)]
    await asyncio.to_thread(append_events, events_address, tenant, later)

    found = read_examples(
        client,
        tenant,
        n_users=10,
        item_categories=base.open_array("item_categories"),
        history_cap=CAP,
    )
    assert list(zip(found.request_ids, found.items.tolist(), strict=True)) == [("b", 22)]
    assert found.history(0) == [21]
    assert found.counts.snapshot_position == projected.position


def test_a_set_the_log_scores_worse_than_the_base_is_not_served_unless_asked() -> None:
    worse = {"log.auc.click": 0.60, "log.base_auc.click": 0.62}
    assert not from_log.promoted(worse, from_log.FromLogConfig())
    assert from_log.promoted(worse, from_log.FromLogConfig(promote_if_worse=True))
    assert from_log.promoted(
        {"log.auc.click": 0.62, "log.base_auc.click": 0.62}, from_log.FromLogConfig()
    )
