"""Team-draft interleaving: the merge's properties, exact propensities, credit and its tests,
and credit read from a real event log (the events service on the session's Valkey)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from scipy import stats as sps

from core.experiments.interleaving import (
    INTERLEAVED,
    TEAM_A,
    TEAM_B,
    RequestCredit,
    Shown,
    inclusion_probabilities,
    preference,
    preference_from_log,
    random_coins,
    request_credits,
    sign_test,
    team_draft,
)
from core.explore import rng_for
from mesh import redis as mesh_redis
from mesh.server import MeshServer
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings


def _ranking_pairs(count: int, seed: int = 0) -> Iterator[tuple[list[int], list[int], int]]:
    """Random pairs of rankings of at least ``n`` items over a small shared pool, so they
    overlap and conflict often (the hard cases)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(1, 13))
        pool = int(rng.integers(n, 2 * n + 4))
        a = rng.permutation(pool)[: int(rng.integers(n, pool + 1))].tolist()
        b = rng.permutation(pool)[: int(rng.integers(n, pool + 1))].tolist()
        yield a, b, n


def test_every_merged_item_comes_from_a_ranking_once() -> None:
    for seed, (a, b, n) in enumerate(_ranking_pairs(500)):
        merged = team_draft(a, b, n, random_coins(np.random.default_rng(seed)))
        assert set(merged.items) <= set(a) | set(b)
        assert len(set(merged.items)) == len(merged.items) == min(n, len(set(a) | set(b)))
        assert len(merged.teams) == len(merged.items)


def test_in_every_prefix_the_teams_differ_by_at_most_one() -> None:
    for seed, (a, b, n) in enumerate(_ranking_pairs(500)):
        merged = team_draft(a, b, n, random_coins(np.random.default_rng(seed)))
        teams = np.asarray(merged.teams)
        by_a = np.cumsum(teams == TEAM_A)
        by_b = np.cumsum(teams == TEAM_B)
        assert np.all(np.abs(by_a - by_b) <= 1), (a, b, n, merged)


def test_each_team_picks_its_best_item_left_so_keeps_its_order() -> None:
    for seed, (a, b, n) in enumerate(_ranking_pairs(500)):
        merged = team_draft(a, b, n, random_coins(np.random.default_rng(seed)))
        for team, ranking in ((TEAM_A, a), (TEAM_B, b)):
            picks = [item for item, t in zip(merged.items, merged.teams, strict=True) if t == team]
            assert picks == sorted(picks, key=ranking.index)
        for k, (item, team) in enumerate(zip(merged.items, merged.teams, strict=True)):
            ranking = a if team == TEAM_A else b
            best_left = next(x for x in ranking if x not in merged.items[:k])
            assert item == best_left


def test_the_coin_decides_who_picks_first_in_each_round() -> None:
    a, b = [1, 2, 3, 4], [1, 2, 3, 4]
    assert team_draft(a, b, 4, [True, True]).teams == (TEAM_A, TEAM_B, TEAM_A, TEAM_B)
    assert team_draft(a, b, 4, [False, True]).teams == (TEAM_B, TEAM_A, TEAM_A, TEAM_B)
    # A conflict: both want item 7; who picks first gets it, the other takes its next.
    assert team_draft([7, 1], [7, 2], 2, [True]).items == (7, 2)
    assert team_draft([7, 1], [7, 2], 2, [False]).items == (7, 1)
    with pytest.raises(ValueError, match="coins ran out"):
        team_draft(a, b, 4, [True])


def test_the_services_coin_favours_neither_team_over_many_requests() -> None:
    """The ranking service draws each request's coins from ``rng_for(request_id, tenant)``;
    over 4000 requests with the same two rankings, A picks first about half of the time at
    every round (a sign test far from rejecting), and each team is credited with the top
    slot about as often."""
    a, b = list(range(10)), list(range(10, 20))
    firsts = np.zeros((4000, 5), dtype=bool)
    for r in range(firsts.shape[0]):
        merged = team_draft(a, b, 10, random_coins(rng_for(f"req-{r}", "demo")))
        firsts[r] = [merged.teams[2 * k] == TEAM_A for k in range(5)]
    for column in firsts.T:
        assert sps.binomtest(int(column.sum()), column.size, 0.5).pvalue > 0.001
    assert abs(firsts.mean() - 0.5) < 0.02


def test_inclusion_probabilities_match_every_coin_sequence() -> None:
    """Exact: the share of the 2**n equally likely coin sequences that show each item."""
    for a, b, n in _ranking_pairs(300, seed=1):
        counts: dict[int, int] = {}
        sequences = list(itertools.product([True, False], repeat=n))
        for coins in sequences:
            for item in team_draft(a, b, n, coins).items:
                counts[item] = counts.get(item, 0) + 1
        probabilities = inclusion_probabilities(a, b, n)
        assert probabilities is not None
        for item in set(a) | set(b):
            assert probabilities[item] == pytest.approx(counts.get(item, 0) / len(sequences))
        assert sum(probabilities.values()) == pytest.approx(min(n, len(set(a) | set(b))))


def test_inclusion_probabilities_of_a_conflict() -> None:
    # Both rank item 7 first: it is always shown; 1 and 2 each half the time.
    assert inclusion_probabilities([7, 1], [7, 2], 2) == {7: 1.0, 1: 0.5, 2: 0.5}
    # Same ranking on both sides: the draft shows its head, whatever the coins.
    assert inclusion_probabilities([1, 2, 3], [1, 2, 3], 2) == {1: 1.0, 2: 1.0, 3: 0.0}


def test_inclusion_probabilities_give_up_past_the_state_cap() -> None:
    # The first round's coin splits the draft into two states (A or B took item 7).
    assert inclusion_probabilities([7, 1], [7, 2], 2, max_states=1) is None
    assert inclusion_probabilities([7, 1], [7, 2], 2, max_states=2) is not None


def test_credit_joins_clicks_to_the_team_that_picked_the_item() -> None:
    shown = [
        Shown("r1", "u1", 10, "heavy"),
        Shown("r1", "u1", 11, "light"),
        Shown("r1", "u1", 12, "heavy"),
        Shown("r2", "u2", 10, "light"),
        Shown("r2", "u2", 11, "heavy"),
        Shown("r3", "u2", 13, "heavy"),
        Shown("r3", "u2", 14, "light"),
        Shown("r4", "u3", 15, "other"),  # not an arm of this experiment
    ]
    clicked = [
        ("r1", 10),
        ("r1", 10),  # the same item clicked twice counts once
        ("r1", 12),
        ("r1", 11),
        ("r2", 10),
        ("r2", 99),  # no such impression
        ("r3", 13),
        ("r3", 14),
        ("r9", 10),  # no such request
    ]
    credits = request_credits(shown, clicked, ("heavy", "light"))
    assert credits == [
        RequestCredit("r1", "u1", 2, 1),
        RequestCredit("r2", "u2", 0, 1),
        RequestCredit("r3", "u2", 1, 1),
    ]
    assert [c.outcome for c in credits] == [1, -1, 0]
    with pytest.raises(ValueError, match="distinct"):
        request_credits(shown, clicked, ("heavy", "heavy"))


def test_the_sign_test_of_a_constructed_imbalance() -> None:
    # 60 wins against 40 of 100 fair trials: P(X >= 60) + P(X <= 40) = 0.0569.
    assert sign_test(60, 40) == pytest.approx(0.056887, abs=1e-6)
    assert sign_test(40, 60) == sign_test(60, 40)
    assert sign_test(50, 50) == pytest.approx(1.0)
    assert sign_test(0, 0) == 1.0
    # 15 requests won by A, 3 by B, 2 ties, 10 without a click, over 10 users.
    outcomes = [(1, 0)] * 15 + [(0, 1)] * 3 + [(1, 1)] * 2 + [(0, 0)] * 10
    credits = [RequestCredit(f"r{i}", f"u{i % 10}", a, b) for i, (a, b) in enumerate(outcomes)]
    found = preference(credits, ("A", "B"), bootstrap=500)
    assert (found.requests, found.clicked_requests) == (30, 20)
    assert (found.wins_a, found.wins_b, found.ties) == (15, 3, 2)
    assert found.preference == pytest.approx((15 - 3) / 20)
    assert found.p_value == pytest.approx(sps.binomtest(15, 18).pvalue)
    assert found.p_value < 0.01
    assert found.users == 10
    assert found.users_a + found.users_b + found.users_tied == 10
    assert found.user_p_value == pytest.approx(sign_test(found.users_a, found.users_b))
    assert found.ci is not None and found.ci[0] < found.preference < found.ci[1]
    assert preference(credits, ("A", "B"), bootstrap=0).ci is None


def test_no_clicks_is_no_preference() -> None:
    found = preference([RequestCredit("r", "u", 0, 0)], ("A", "B"))
    assert (found.preference, found.p_value, found.user_p_value) == (0.0, 1.0, 1.0)
    assert found.ci is None


@pytest.fixture(scope="module")
async def events(redis_url: str) -> AsyncIterator[MeshServer]:
    settings = EventsSettings(redis_url=redis_url, port=0, drain_delay_s=0.0)
    async with serving(await built_server(build_events, settings)) as server:
        yield server


def _impression(request_id: str, user: str, item: int, team: str, key: str) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"{request_id}:{item}",
        type="impression",
        user_id=user,
        item_id=item,
        request_id=request_id,
        ts_ms=1_700_000_000_000,
        propensity=1.0,
        variants={key: INTERLEAVED},
        team=team,
    )


def _click(request_id: str, user: str, item: int, n: int = 0) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"click:{request_id}:{item}:{n}",
        type="click",
        user_id=user,
        item_id=item,
        request_id=request_id,
        ts_ms=1_700_000_001_000,
    )


async def test_preference_from_a_constructed_log(events: MeshServer, redis_url: str) -> None:
    """Impressions and clicks appended through the events service, read back by
    :func:`preference_from_log`: A wins two requests, B one, one ties, one has no click;
    another experiment's request and an impression without a team are left out."""
    tenant, key = "interleave-log", "heavy-vs-light"
    log = [
        *(_impression("q1", "u1", i, t, key) for i, t in ((1, "heavy"), (2, "light"))),
        *(_impression("q2", "u1", i, t, key) for i, t in ((3, "light"), (4, "heavy"))),
        *(_impression("q3", "u2", i, t, key) for i, t in ((5, "heavy"), (6, "light"))),
        *(_impression("q4", "u2", i, t, key) for i, t in ((7, "heavy"), (8, "light"))),
        *(_impression("q5", "u3", i, t, key) for i, t in ((9, "light"), (10, "heavy"))),
        _impression("q6", "u3", 11, "heavy", "another-experiment"),
        _impression("q7", "u3", 12, "", key),
        _click("q1", "u1", 1),
        _click("q1", "u1", 1, 1),
        _click("q2", "u1", 4),
        _click("q3", "u2", 6),
        _click("q4", "u2", 7),
        _click("q4", "u2", 8),
        _click("q6", "u3", 11),
        _click("q7", "u3", 12),
    ]
    async with channel_to(events) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        await stub.Append(events_pb2.AppendRequest(events=log), metadata=tenant_metadata(tenant))
    client = mesh_redis.client(redis_url)
    try:
        found = await preference_from_log(client, tenant, key, ("heavy", "light"), bootstrap=200)
    finally:
        await client.aclose()
    assert (found.requests, found.clicked_requests) == (5, 4)
    assert (found.wins_a, found.wins_b, found.ties) == (2, 1, 1)
    assert found.preference == pytest.approx(0.25)
    assert found.p_value == pytest.approx(sign_test(2, 1))
    assert (found.users, found.users_a, found.users_b, found.users_tied) == (3, 1, 1, 0)
