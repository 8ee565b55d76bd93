"""Off-policy evaluation on the tiny set's world, where every policy's true CTR is known.

* the propensities the simulated serve logs are the frequencies with which it shows items
  (one context replayed thousands of times);
* over replicated logs of the tiny set's serve, the 95 % intervals of IPS, SNIPS and DR
  cover a candidate policy's true CTR, and the naive (logged) CTR misses it;
* ``python -m training ope`` reads a log through the real events service and Valkey and
  reports the estimates of what was served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2

from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from mesh.testing import built_server, serving
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings
from training.__main__ import main
from training.log_data import LogExamples, build_examples
from training.ope import (
    Candidate,
    LoggedImpressions,
    RerankPolicy,
    evaluate,
    evaluate_rerank,
    load_candidate,
    true_ctr,
    true_rerank_ctr,
)
from training.simulate import (
    DEFAULT_CONTEXT,
    Ranker,
    ServeConfig,
    ServePolicy,
    Slates,
    append_events,
    serve_slates,
    simulate_serve,
)
from training.world import World

LOGGER = ServeConfig()
"""The logging policy: the serve's defaults (100 candidates, slate 10, 1 exploration slot)."""
CANDIDATE = {"candidates": 300}
"""A candidate that exploits harder: the ranker's best of 300 candidates instead of 100."""


@pytest.fixture(scope="module")
def base(tiny_root: Path) -> ArtifactSet:
    return load_artifact_set(resolve_current(tiny_root))


@pytest.fixture(scope="module")
def world(base: ArtifactSet) -> World:
    from training.pipeline import world_of

    return world_of(base)[0]


@pytest.fixture(scope="module")
def candidate_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "candidate.json"
    path.write_text(json.dumps(CANDIDATE))
    return path


@pytest.fixture(scope="module")
def candidate(candidate_file: Path, tiny_root: Path) -> Candidate[ServePolicy]:
    """The candidate policy, its tables cached for the module's tests."""
    return load_candidate(str(candidate_file), tiny_root, cache=True)


def test_logged_propensities_are_how_often_the_serve_shows_each_item(
    base: ArtifactSet, world: World
) -> None:
    # Every request from an unknown user: one context (the default row), replayed.
    config = ServeConfig(requests=4000, explore_slots=2, unknown_share=1.0, seed=5)
    events = simulate_serve(base, world, config, int(time.time() * 1000))
    impressions = [e for e in events if e.type == "impression"]
    items = np.array([e.item_id for e in impressions])
    logged = np.array([e.propensity for e in impressions])
    table = ServePolicy(Ranker(base), config).table(DEFAULT_CONTEXT)
    # What is logged is the policy's probability for the item, and they sum to the slate.
    np.testing.assert_allclose(logged, table.inclusion[items], rtol=1e-12)
    assert table.inclusion.sum() == pytest.approx(config.slate)
    assert table.inclusion.min() > 0
    # Calibration: per tenth of the items by propensity, shown as often as the propensities say.
    shown = np.bincount(items, minlength=table.inclusion.size)
    for b, members in enumerate(np.array_split(np.argsort(table.inclusion), 10)):
        expected = config.requests * table.inclusion[members]
        spread = np.sqrt((expected * (1 - table.inclusion[members])).sum())
        z = (shown[members].sum() - expected.sum()) / spread
        assert abs(z) < 4, (b, z)
    # And item by item: the largest deviation is what 2000 binomial draws give.
    p = table.inclusion
    z_items = (shown - config.requests * p) / np.sqrt(config.requests * p * (1 - p))
    assert np.abs(z_items).max() < 5


def test_intervals_cover_the_candidates_true_ctr_over_replicated_logs(
    base: ArtifactSet, world: World, candidate: Candidate[ServePolicy]
) -> None:
    logger = ServePolicy(Ranker(base), LOGGER, cache=True)
    truth = true_ctr(candidate.policy, world, LOGGER.unknown_share)
    logger_truth = true_ctr(logger, world, LOGGER.unknown_share)
    rng = np.random.default_rng(21)
    runs, answers = 100, 500
    covered = {"naive": 0, "ips": 0, "snips": 0, "dr": 0}
    naive = []
    for _ in range(runs):
        users = rng.integers(0, world.config.n_users, size=answers)
        contexts = np.where(rng.random(answers) < LOGGER.unknown_share, DEFAULT_CONTEXT, users)
        slates = serve_slates(logger, contexts, rng)
        clicks, _ = world.simulate(
            users.repeat(LOGGER.slate), slates.items.ravel(), seed=int(rng.integers(2**31))
        )
        log = LoggedImpressions(
            contexts=contexts.repeat(LOGGER.slate),
            items=slates.items.ravel(),
            clicks=clicks.astype(np.float64),
            propensities=slates.propensities.ravel(),
            requests=np.arange(answers).repeat(LOGGER.slate),
        )
        result = evaluate(log, candidate.policy)
        for name in covered:
            covered[name] += getattr(result, name).covers(truth)
        naive.append(result.naive.estimate)
    for name in ("ips", "snips", "dr"):
        assert covered[name] / runs >= 0.9, (name, covered)
    # The logged CTR is the logger's, and it misses the candidate's most of the time.
    assert truth - logger_truth > 0.01
    assert np.mean(naive) == pytest.approx(logger_truth, abs=0.003)
    assert covered["naive"] / runs < 0.5


@pytest.fixture(scope="module")
async def events_address(redis_url: str) -> AsyncIterator[str]:
    server = await built_server(build_events, EventsSettings(port=0, redis_url=redis_url))
    async with serving(server):
        yield f"127.0.0.1:{server.port}"


def impressions_of(events: list[events_pb2.Event], n_users: int) -> LoggedImpressions:
    """The served impressions joined with their clicks, straight from the events."""
    clicked = {(e.request_id, e.item_id) for e in events if e.type == "click"}
    shown = [e for e in events if e.type == "impression"]
    _, codes = np.unique([e.request_id for e in shown], return_inverse=True)
    contexts = [
        int(e.user_id[1:]) if e.user_id.startswith("u") and int(e.user_id[1:]) < n_users else -1
        for e in shown
    ]
    return LoggedImpressions(
        contexts=np.array(contexts, dtype=np.int64),
        items=np.array([e.item_id for e in shown], dtype=np.int64),
        clicks=np.array([(e.request_id, e.item_id) in clicked for e in shown], dtype=float),
        propensities=np.array([e.propensity for e in shown], dtype=np.float64),
        requests=codes.astype(np.int64),
    )


async def test_ope_command_estimates_the_candidate_from_the_log(
    base: ArtifactSet,
    world: World,
    tiny_root: Path,
    candidate_file: Path,
    candidate: Candidate[ServePolicy],
    events_address: str,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = "ope" + uuid.uuid4().hex[:8]
    config = ServeConfig(requests=800, seed=9)
    events = simulate_serve(base, world, config, int(time.time() * 1000) - 3_600_000)
    await asyncio.to_thread(append_events, events_address, tenant, events)
    argv = ["ope", "--policy", str(candidate_file), "--root", str(tiny_root)]
    argv += ["--tenant", tenant, "--redis-url", redis_url]
    assert await asyncio.to_thread(main, [*argv, "--json", "--truth"]) == 0
    report = json.loads(capsys.readouterr().out)

    expected = evaluate(impressions_of(events, candidate.policy.ranker.n_users), candidate.policy)
    assert report["policy"]["candidates"] == 300
    assert report["policy"]["artifacts"] == base.version
    assert (report["requests"], report["impressions"]) == (800, 8000)
    assert report["clicks"] == expected.clicks
    for name in ("naive", "ips", "snips", "dr"):
        interval = getattr(expected, name)
        assert report[name]["estimate"] == pytest.approx(interval.estimate, rel=1e-6)
        assert report[name]["low"] == pytest.approx(interval.low, rel=1e-6)
    assert report["true_ctr"] == pytest.approx(true_ctr(candidate.policy, world, 0.05))
    assert report["ips"]["low"] <= report["true_ctr"] <= report["ips"]["high"]
    assert report["log"]["skipped_requests"] == 0

    assert await asyncio.to_thread(main, argv) == 0
    text = capsys.readouterr().out
    for label in ("naive", "IPS", "SNIPS", "DR", "effective sample size"):
        assert label in text

    # A log of the mesh's kind: ranked slots logged with propensity 1, given the candidates.
    mesh_tenant = "mesh" + uuid.uuid4().hex[:6]
    conditional = [
        events_pb2.Event(
            event_id=f"m{r}-{slot}",
            type="impression",
            user_id="u1",
            item_id=10 * r + slot,
            request_id=f"m{r}",
            ts_ms=int(time.time() * 1000),
            position=slot,
            propensity=1.0 if slot < 9 else 0.1,
        )
        for r in range(3)
        for slot in range(10)
    ]
    await asyncio.to_thread(append_events, events_address, mesh_tenant, conditional)
    mesh_argv = ["ope", "--policy", str(candidate_file), "--root", str(tiny_root)]
    mesh_argv += ["--tenant", mesh_tenant, "--redis-url", redis_url]
    assert await asyncio.to_thread(main, mesh_argv) == 1
    assert "27 impressions" in capsys.readouterr().err

    empty = ["ope", "--policy", str(candidate_file), "--root", str(tiny_root)]
    empty += ["--tenant", "nobody" + uuid.uuid4().hex[:6], "--redis-url", redis_url]
    assert await asyncio.to_thread(main, empty) == 1
    assert "cannot be evaluated" in capsys.readouterr().err


# The mesh's logs: supports and probabilities given them (core.explore), as the ranking
# service logs them; the simulated serve logs the same with ``explore_pool``.

MESH_LOGGER = ServeConfig(explore_slots=2, explore_pool=20)
"""A logger the mesh's way: the ranker's best 8 of 100 candidates, 2 slots explored from
the 20 candidates after them."""


def read_back(events: list[events_pb2.Event], base: ArtifactSet) -> LogExamples:
    """``events`` as the log reader joins them, appended in event-time order."""
    return build_examples(
        ((f"{e.ts_ms}-{k}", e) for k, e in enumerate(events)),
        tenant="t",
        n_users=base.open_array("user_features").shape[0],
        item_categories=base.open_array("item_categories"),
        history_cap=50,
    )


def mesh_log(
    slates: Slates, contexts: np.ndarray, users: np.ndarray, clicks: np.ndarray
) -> LoggedImpressions:
    """The impressions of ``slates`` (served the mesh's way) with their supports."""
    assert slates.supports is not None
    answers, slate = slates.items.shape
    return LoggedImpressions(
        contexts=contexts.repeat(slate),
        items=slates.items.ravel(),
        clicks=clicks.astype(np.float64),
        propensities=slates.propensities.ravel(),
        requests=np.arange(answers).repeat(slate),
        supports=list(slates.supports),
        world_users=users.repeat(slate),
    )


def test_the_mesh_way_logs_each_answers_support_and_probabilities_given_it(
    base: ArtifactSet, world: World
) -> None:
    events = simulate_serve(
        base, world, dataclasses.replace(MESH_LOGGER, requests=200, seed=3), int(time.time() * 1000)
    )
    impressions = [e for e in events if e.type == "impression"]
    by_request: dict[str, list[events_pb2.Event]] = {}
    for event in impressions:
        by_request.setdefault(event.request_id, []).append(event)
    assert len(by_request) == 200
    for answer in by_request.values():
        answer.sort(key=lambda e: e.position)
        support = list(answer[0].support)
        assert len(support) == 8 + 20 and len(set(support)) == 28
        assert all(not e.support for e in answer[1:])
        exploit = [e for e in answer if e.source != common_pb2.SOURCE_EXPLORE]
        explored = [e for e in answer if e.source == common_pb2.SOURCE_EXPLORE]
        # The ranked items are the support's head, in order; the explored come from its pool.
        assert [e.item_id for e in exploit] == support[:8]
        assert {e.item_id for e in explored} <= set(support[8:]) and len(explored) == 2
        assert [e.propensity for e in exploit] == [1.0] * 8
        assert [e.propensity for e in explored] == [pytest.approx(2 / 20)] * 2
        assert answer[0].source != common_pb2.SOURCE_EXPLORE

    # Read back through the log reader, the logger itself as the candidate weighs each
    # impression exactly 1: the candidate's probabilities are the logged ones.
    examples = read_back(events, base)
    log = LoggedImpressions.from_supported(examples, world.config.n_items, slate=10)
    assert log.skipped_requests == 0 and len(log.supports or []) == 200
    itself = RerankPolicy(
        Ranker(base), slate=10, explore_share=0.2, explore_pool=20, keep_order=True
    )
    result = evaluate_rerank(log, itself)
    assert result.max_weight == pytest.approx(1.0) and result.mean_weight == pytest.approx(1.0)
    assert result.ips.estimate == pytest.approx(result.naive.estimate)
    assert result.snips.estimate == pytest.approx(result.naive.estimate)


def test_final_stage_intervals_cover_the_candidates_true_ctr_on_mesh_logs(
    base: ArtifactSet, world: World
) -> None:
    logger = ServePolicy(Ranker(base), MESH_LOGGER, cache=True)
    # The candidate: 10 of each support's 28 items drawn uniformly (all slots explore).
    candidate = RerankPolicy(
        Ranker(base), slate=10, explore_share=1.0, explore_pool=28, keep_order=True, cache=True
    )
    rng = np.random.default_rng(8)

    def serve(answers: int) -> LoggedImpressions:
        users = rng.integers(0, world.config.n_users, size=answers)
        contexts = np.where(rng.random(answers) < 0.05, DEFAULT_CONTEXT, users)
        slates = serve_slates(logger, contexts, rng)
        clicks, _ = world.simulate(
            users.repeat(10), slates.items.ravel(), seed=int(rng.integers(2**31))
        )
        return mesh_log(slates, contexts, users, clicks)

    # The truth over the logger's distribution of (user, support): a large sample of it.
    big = serve(20_000)
    truth = true_rerank_ctr(big, candidate, world)
    logged = float(big.clicks.mean())
    runs, covered = 100, {"naive": 0, "ips": 0, "snips": 0, "dr": 0}
    for _ in range(runs):
        result = evaluate_rerank(serve(500), candidate)
        for name in covered:
            covered[name] += getattr(result, name).covers(truth)
    for name in ("ips", "snips", "dr"):
        assert covered[name] / runs >= 0.9, (name, covered)
    assert logged - truth > 0.01  # the ranked head beats a uniform draw from the support
    assert covered["naive"] / runs < 0.5


def test_a_final_stage_shows_its_rankers_head_and_explores_the_next_pool(
    base: ArtifactSet,
) -> None:
    ranker = Ranker(base)
    support = np.random.default_rng(4).choice(ranker.n_items, size=30, replace=False)
    stage = RerankPolicy(ranker, slate=10, explore_share=0.2, explore_pool=10)
    table = stage.table(DEFAULT_CONTEXT, support)
    by_score = np.argsort(-ranker.score(ranker.predict(DEFAULT_CONTEXT, support)), kind="stable")
    expected = np.zeros(30)
    expected[by_score[:8]] = 1.0  # the ranker's best 8 are shown
    expected[by_score[8:18]] = 2 / 10  # 2 slots drawn from the next 10
    np.testing.assert_allclose(table.inclusion, expected)
    assert table.inclusion.sum() == pytest.approx(10)
    # Keeping the logged order: the support's own head and pool.
    logged = RerankPolicy(ranker, slate=10, explore_share=0.2, explore_pool=10, keep_order=True)
    kept = logged.table(DEFAULT_CONTEXT, support).inclusion
    np.testing.assert_allclose(kept, [1.0] * 8 + [0.2] * 10 + [0.0] * 12)


def test_answers_inconsistent_with_their_support_are_left_out(
    base: ArtifactSet, world: World
) -> None:
    config = dataclasses.replace(MESH_LOGGER, requests=50, seed=6)
    events = simulate_serve(base, world, config, int(time.time() * 1000))
    firsts = [e for e in events if e.type == "impression" and e.position == 0]
    # One answer's support loses a shown item; another's ranked head is reordered.
    del firsts[0].support[0]
    firsts[1].support[:] = list(reversed(firsts[1].support))
    examples = read_back(events, base)
    log = LoggedImpressions.from_supported(examples, world.config.n_items, slate=10)
    assert log.skipped_requests == 2 and len(log.supports or []) == 48
    # A slate longer than the supports leaves every answer out.
    assert (
        LoggedImpressions.from_supported(examples, world.config.n_items, 29).skipped_requests == 50
    )
