"""Team-draft interleaving (Radlinski, Kurup and Joachims, 2008): merging two rankings into
one list, the propensity of each shown item, and the credit each ranker earns from clicks.

**Merging** (:func:`team_draft`). Two teams, A and B, each hold one ranking. In each round
a fair coin decides which team picks first; each team then picks its highest-ranked item
not yet in the merged list, and the item joins the list on that team. When one team
cannot pick (its ranking has nothing left), the other picks. Given rankings of at least
``n`` items each, every prefix of the merged list holds as many items of one team as of the
other, or one more, and each team's picks keep its own order. Only the first ``n`` items of
each ranking can ever be picked (the next item of a team is at most one place below the
length of the merged list), so callers pass the heads.

**Propensity** (:func:`inclusion_probabilities`). The merged list is random only through
the coins, so the probability that an item is shown, given the two rankings, is exact: the
sum over the coin sequences that show it, computed over the distinct states of the draft
(which items are picked, how many by A). That is what an interleaved impression logs as its
propensity, so ``Event.propensity`` keeps its meaning (the probability the item had of
being shown by this request's policy); items in both heads are shown with probability 1,
an item only one team wants with less. Past :data:`MAX_STATES` distinct states (long lists
whose rankings conflict often) the probability is not computed and the impression logs 0,
"unknown".

**Credit** (:func:`request_credits`, :func:`preference`). A click credits the team that
picked the clicked item. Per request (clicks joined to the request's impressions by
``request_id`` and ``item_id``, each clicked item counted once), A wins when more of its
items were clicked, B when more of B's, a tie when as many (and at least one). The
preference is ``(wins_A - wins_B) / (wins_A + wins_B + ties)``, in [-1, 1], positive when
A is preferred. Its significance, two ways:

* requests: the two-sided binomial sign test of ``wins_A`` among the non-tied requests
  (``scipy.stats.binomtest``, p = 1/2 under no preference);
* users: each user's net wins (``wins_A - wins_B`` over their requests) vote for A or B
  (or tie), and the same sign test runs on the users' votes. A user's requests share their
  taste, so they are not independent trials; the users' test does not assume they are,
  and it is the one to decide with. A percentile bootstrap over users
  (``scipy.stats.bootstrap``) gives a confidence interval of the preference.

:func:`preference_from_log` computes it all from a tenant's event log: the impressions the
gateway logged for requests in the interleaving experiment (``variants[key]`` is
:data:`INTERLEAVED`, ``team`` names the arm), and the clicks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from core.logread import iter_log

if TYPE_CHECKING:
    from mesh.redis import AsyncRedis

INTERLEAVED = "interleaved"
"""The variant key of every assignment to an interleaving experiment (every user in one
sees both arms): what the impressions' ``variants`` map names the experiment with."""

MAX_STATES = 4096
"""Most distinct draft states :func:`inclusion_probabilities` follows; beyond, the
propensities are unknown. Lists of up to 24 items never reach it (2**12 coin sequences)."""

TEAM_A, TEAM_B = 0, 1
"""Team indices: A is the first arm of the experiment (its control), B the second."""


@dataclass(frozen=True)
class Interleaved:
    """A merged list: the items, best first, and the team (:data:`TEAM_A` or
    :data:`TEAM_B`) that picked each."""

    items: tuple[int, ...]
    teams: tuple[int, ...]


def random_coins(rng: np.random.Generator) -> Iterator[bool]:
    """Fair coins from ``rng``, True when team A picks first in the round."""
    while True:
        yield from (bool(flip) for flip in rng.integers(0, 2, size=16) == 0)


def team_draft(a: Sequence[int], b: Sequence[int], n: int, coins: Iterable[bool]) -> Interleaved:
    """Merge rankings ``a`` and ``b`` (item ids, best first) into at most ``n`` items.

    One coin of ``coins`` is used per round in which both teams have picked as often (True:
    A picks first); see the module docstring. The list is shorter than ``n`` only when the
    two rankings together hold fewer than ``n`` distinct items.

    Raises:
        ValueError: ``n`` is negative, or ``coins`` ran out.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    flips = iter(coins)
    picked: set[int] = set()
    items: list[int] = []
    teams: list[int] = []
    pointers = [0, 0]
    lists = (a, b)
    counts = [0, 0]
    while len(items) < n:
        nexts = [_next(lists[t], pointers, t, picked) for t in (TEAM_A, TEAM_B)]
        if nexts[TEAM_A] is None and nexts[TEAM_B] is None:
            break
        if counts[TEAM_A] < counts[TEAM_B]:
            team = TEAM_A
        elif counts[TEAM_B] < counts[TEAM_A]:
            team = TEAM_B
        else:
            try:
                team = TEAM_A if next(flips) else TEAM_B
            except StopIteration:
                raise ValueError("coins ran out") from None
        if nexts[team] is None:
            team = 1 - team
        item = nexts[team]
        assert item is not None
        picked.add(item)
        items.append(item)
        teams.append(team)
        counts[team] += 1
    return Interleaved(tuple(items), tuple(teams))


def _next(ranking: Sequence[int], pointers: list[int], team: int, picked: set[int]) -> int | None:
    """The team's highest-ranked item not yet picked (its pointer moved up to it)."""
    i = pointers[team]
    while i < len(ranking) and ranking[i] in picked:
        i += 1
    pointers[team] = i
    return ranking[i] if i < len(ranking) else None


def inclusion_probabilities(
    a: Sequence[int], b: Sequence[int], n: int, max_states: int = MAX_STATES
) -> dict[int, float] | None:
    """The probability of each item of ``a`` or ``b`` of being in the merged list of
    :func:`team_draft` with fair coins, or None past ``max_states`` distinct states.

    Exact: it follows every distinct draft state (the picked items and how many A picked)
    with its probability. The probabilities sum to the merged list's length.
    """
    universe = list(dict.fromkeys([*a, *b]))
    index = {item: i for i, item in enumerate(universe)}
    ranks = ([index[x] for x in a], [index[x] for x in b])
    # A state: (bitmask of picked universe indices, picks by A, picks by B) -> probability.
    states: dict[tuple[int, int, int], float] = {(0, 0, 0): 1.0}
    final: dict[int, float] = {}
    while states:
        following: dict[tuple[int, int, int], float] = {}
        for (mask, by_a, by_b), p in states.items():
            nexts = [_first_free(ranks[t], mask) for t in (TEAM_A, TEAM_B)]
            if by_a + by_b >= n or (nexts[TEAM_A] is None and nexts[TEAM_B] is None):
                final[mask] = final.get(mask, 0.0) + p
                continue
            if by_a < by_b:
                choices = [(TEAM_A, p)]
            elif by_b < by_a:
                choices = [(TEAM_B, p)]
            else:
                choices = [(TEAM_A, p / 2), (TEAM_B, p / 2)]
            for team, q in choices:
                if nexts[team] is None:
                    team = 1 - team
                bit = nexts[team]
                assert bit is not None
                key = (mask | (1 << bit), by_a + (team == TEAM_A), by_b + (team == TEAM_B))
                following[key] = following.get(key, 0.0) + q
        if len(following) > max_states:
            return None
        states = following
    shown = [0.0] * len(universe)
    for mask, p in final.items():
        for i in range(len(universe)):
            if mask >> i & 1:
                shown[i] += p
    return {item: min(1.0, shown[i]) for i, item in enumerate(universe)}


def _first_free(ranking: list[int], mask: int) -> int | None:
    for i in ranking:
        if not mask >> i & 1:
            return i
    return None


@dataclass(frozen=True)
class Shown:
    """One impression of an interleaved request: what credit needs of it."""

    request_id: str
    user_id: str
    item_id: int
    team: str


@dataclass(frozen=True)
class RequestCredit:
    """The clicked items of one interleaved request, by team."""

    request_id: str
    user_id: str
    clicks_a: int
    clicks_b: int

    @property
    def outcome(self) -> int:
        """+1 when A won, -1 when B won, 0 for a tie or no click."""
        return (self.clicks_a > self.clicks_b) - (self.clicks_b > self.clicks_a)


def request_credits(
    shown: Iterable[Shown], clicked: Iterable[tuple[str, int]], arms: tuple[str, str]
) -> list[RequestCredit]:
    """Each request's clicked items by team, in the order requests were first shown.

    Args:
        shown: impressions of interleaved requests; those whose team is neither arm are
            left out.
        clicked: ``(request_id, item_id)`` of each click (repeats count once; clicks that
            match no impression of ``shown`` are ignored).
        arms: the team names of A and B (the experiment's variant keys).

    Raises:
        ValueError: the arms are not two distinct names.
    """
    if len(arms) != 2 or arms[0] == arms[1]:
        raise ValueError(f"arms must be two distinct names, got {arms!r}")
    team_of: dict[str, dict[int, int]] = {}
    user_of: dict[str, str] = {}
    for impression in shown:
        if impression.team not in arms:
            continue
        team = TEAM_A if impression.team == arms[0] else TEAM_B
        team_of.setdefault(impression.request_id, {})[impression.item_id] = team
        user_of.setdefault(impression.request_id, impression.user_id)
    counts = {request_id: [0, 0] for request_id in team_of}
    for request_id, item_id in set(clicked):
        credited = team_of.get(request_id, {}).get(item_id)
        if credited is not None:
            counts[request_id][credited] += 1
    return [
        RequestCredit(request_id, user_of[request_id], a, b)
        for request_id, (a, b) in counts.items()
    ]


@dataclass(frozen=True)
class Preference:
    """Which arm the clicks of an interleaving experiment prefer (module docstring).

    Attributes:
        arms: the names of A and B.
        requests: interleaved requests with at least one impression of either team.
        clicked_requests: those with at least one credited click.
        wins_a, wins_b, ties: outcomes of the clicked requests.
        preference: ``(wins_a - wins_b) / clicked_requests``; 0 without clicked requests.
        p_value: two-sided sign test of the requests' wins (1 without a non-tied request).
        users: users with at least one interleaved request.
        users_a, users_b, users_tied: users whose net wins favour A, B, neither (among the
            users with a clicked request).
        user_p_value: two-sided sign test of the users' votes (1 without a vote).
        ci: percentile bootstrap interval of ``preference`` over users, at ``confidence``;
            None when not asked for or fewer than two users clicked.
        confidence: the interval's level.
    """

    arms: tuple[str, str]
    requests: int
    clicked_requests: int
    wins_a: int
    wins_b: int
    ties: int
    preference: float
    p_value: float
    users: int
    users_a: int
    users_b: int
    users_tied: int
    user_p_value: float
    ci: tuple[float, float] | None
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        return {
            "arms": {"a": self.arms[0], "b": self.arms[1]},
            "requests": self.requests,
            "clicked_requests": self.clicked_requests,
            "wins_a": self.wins_a,
            "wins_b": self.wins_b,
            "ties": self.ties,
            "preference": self.preference,
            "p_value": self.p_value,
            "users": self.users,
            "users_a": self.users_a,
            "users_b": self.users_b,
            "users_tied": self.users_tied,
            "user_p_value": self.user_p_value,
            "ci": list(self.ci) if self.ci is not None else None,
            "confidence": self.confidence,
        }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided binomial sign test of ``wins`` against ``losses`` (ties left out):
    ``scipy.stats.binomtest(wins, wins + losses, 0.5)``; 1 when there is no trial."""
    if wins < 0 or losses < 0:
        raise ValueError("wins and losses must be >= 0")
    if wins + losses == 0:
        return 1.0
    from scipy import stats as sps  # imported when used: serving imports this module

    return float(sps.binomtest(wins, wins + losses, 0.5).pvalue)


def preference(
    credits: Sequence[RequestCredit],
    arms: tuple[str, str],
    *,
    bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Preference:
    """The preference and its tests from per-request credit (module docstring).

    Args:
        credits: one entry per interleaved request.
        arms: the names of A and B.
        bootstrap: resamples of the users' bootstrap interval; 0 skips it.
        confidence: the interval's level, in (0, 1).
        seed: the bootstrap's seed (the interval is reproducible).

    Raises:
        ValueError: ``confidence`` outside (0, 1) or ``bootstrap`` negative.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    if bootstrap < 0:
        raise ValueError("bootstrap must be >= 0")
    outcomes = np.array([c.outcome for c in credits], dtype=np.int64)
    clicked = np.array([c.clicks_a + c.clicks_b > 0 for c in credits], dtype=bool)
    wins_a = int((outcomes > 0).sum())
    wins_b = int((outcomes < 0).sum())
    ties = int(clicked.sum()) - wins_a - wins_b
    users, user_index = np.unique([c.user_id for c in credits], return_inverse=True)
    per_user: dict[str, npt.NDArray[np.float64]] = {
        name: np.bincount(user_index, weights=values, minlength=users.size).astype(np.float64)
        for name, values in (
            ("a", outcomes > 0),
            ("b", outcomes < 0),
            ("ties", clicked & (outcomes == 0)),
        )
    }
    net = per_user["a"] - per_user["b"]
    voted = per_user["a"] + per_user["b"] + per_user["ties"] > 0
    users_a, users_b = int((net > 0).sum()), int((net < 0).sum())
    clicked_requests = int(clicked.sum())
    ci = None
    if bootstrap and int(voted.sum()) >= 2:
        ci = _bootstrap(
            [per_user[name][voted] for name in ("a", "b", "ties")], bootstrap, confidence, seed
        )
    return Preference(
        arms=arms,
        requests=len(credits),
        clicked_requests=clicked_requests,
        wins_a=wins_a,
        wins_b=wins_b,
        ties=ties,
        preference=(wins_a - wins_b) / clicked_requests if clicked_requests else 0.0,
        p_value=sign_test(wins_a, wins_b),
        users=int(users.size),
        users_a=users_a,
        users_b=users_b,
        users_tied=int(voted.sum()) - users_a - users_b,
        user_p_value=sign_test(users_a, users_b),
        ci=ci,
        confidence=confidence,
    )


def _bootstrap(
    samples: list[npt.NDArray[np.float64]], resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap over users of ``(sum a - sum b) / sum(a + b + ties)``."""
    from scipy import stats as sps

    def statistic(
        a: npt.NDArray[np.float64],
        b: npt.NDArray[np.float64],
        ties: npt.NDArray[np.float64],
        axis: int = -1,
    ) -> npt.NDArray[np.float64]:
        total = (a + b + ties).sum(axis=axis)
        return np.asarray((a.sum(axis=axis) - b.sum(axis=axis)) / np.maximum(total, 1.0))

    result = sps.bootstrap(
        tuple(samples),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        batch=max(1, 2_000_000 // max(1, samples[0].size)),
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


async def preference_from_log(
    client: AsyncRedis,
    tenant: str,
    experiment_key: str,
    arms: tuple[str, str],
    *,
    bootstrap: int = 2000,
    confidence: float = 0.95,
) -> Preference:
    """:func:`preference` of interleaving experiment ``experiment_key`` from ``tenant``'s
    event log, read once (:func:`core.logread.iter_log`).

    The experiment's requests are those whose impressions name it with the variant
    :data:`INTERLEAVED` and carry a ``team`` (an impression without one, e.g. logged while
    ranking was down and the answer was retrieval order, is not interleaved and is left
    out); clicks join them by ``request_id`` and ``item_id``.

    Args:
        client: the mesh's Redis.
        tenant: whose log.
        experiment_key: the experiment.
        arms: its variant keys, A (the first) then B.
        bootstrap, confidence: as :func:`preference`.
    """
    shown: list[Shown] = []
    clicked: list[tuple[str, int]] = []
    async for entries in iter_log(client, tenant):
        for _, event in entries:
            if event is None:
                continue
            if event.type == "click" and event.request_id:
                clicked.append((event.request_id, event.item_id))
            elif (
                event.type == "impression"
                and event.team
                and event.variants.get(experiment_key) == INTERLEAVED
            ):
                shown.append(Shown(event.request_id, event.user_id, event.item_id, event.team))
    return preference(
        request_credits(shown, clicked, arms), arms, bootstrap=bootstrap, confidence=confidence
    )
