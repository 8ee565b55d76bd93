"""A simulated serve: the synthetic world's users shown an artifact set's answers, their
clicks and conversions drawn from the world's ground truth, written to a tenant's event log.

It stands in for traffic on the mesh when no real users click, so that the flywheel (serve,
log, train from the log, serve) can be run and measured end to end. :func:`simulate_serve`
builds the events; :func:`append_events` writes them through the events service, the log's
one writer (idempotent by event id: the same run appended twice stores nothing new).

Each request (``gap_ms`` apart) picks a world user uniformly; a share ``unknown_share`` of
requests comes under an id the set does not know (``guest<row>``: the user's ground truth,
the set's default row, the mean). The user as the set sees them (their row, or the default
row) is the request's *context*. The answer (:func:`serve_slates`) draws ``candidates``
items uniformly from the catalogue, orders them by the set's ranker (ONNX, the heads
weighted by the set's ``ranker_head_weights``; ties by the lower item id) and shows the best
``slate - explore_slots`` (source ``ANN``) followed by ``explore_slots`` items drawn
uniformly from the rest of the catalogue (source ``EXPLORE``). Each shown item is clicked,
and a click converted, with the world's probabilities; a click comes ``click_delay_ms``
after its answer and a conversion as long again after the click. The events are returned in
event-time order, which is the order the log gets them: clicks land among the impressions
of later answers, as in a live log.

**Propensities.** Each impression logs the probability that the policy shows its item to
its context (:func:`inclusion_probabilities`), marginal over the policy's own random draws:
the candidate draw and the exploration draw. The candidate list is not logged, so a
probability conditional on it (1 for every item ranked into the slate) would not be the
probability an off-policy estimator needs (:mod:`core.experiments.ope`). With ``N`` items,
``m`` candidates, ``s`` ranked slots and ``e`` exploration slots, and ``r`` the number of
items the ranker puts before item ``i`` for this context, ``i`` is ranked into the slate
when it is drawn (``m / N``) and fewer than ``s`` of the other ``m - 1`` candidates are
among those ``r`` (hypergeometric, ``scipy.stats.hypergeom``); otherwise exploration shows
it with probability ``e / (N - s)``:

    p_rank(i) = (m / N) * P(Hypergeom(N - 1, r, m - 1) <= s - 1)
    p(i) = p_rank(i) + (1 - p_rank(i)) * e / (N - s)

so ``sum_i p(i) = s + e``, the slate, and every item has a positive propensity when
``e > 0``. Computing it scores the whole catalogue once per distinct context
(:class:`ServePolicy`; about 0.1 s per context on the 20k catalogue, 5 µs an item).

**The mesh's way** (``explore_pool > 0``). The ranking service explores differently: the
``e`` exploration items are drawn from the *pool* of the ``explore_pool`` candidates that
follow the ranked ones, into random slots but the first (:func:`core.explore.build_slate`,
the service's own code), and it logs probabilities conditional on the request's candidates
(1 for a ranked item, ``e / pool`` for an explored one) with the answer's *support* (the
ranked items, then the pool) on its first impression. The serve then does the same, so that
off-policy evaluation of the mesh's logs (:mod:`training.ope`, re-rank candidates over the
logged supports) is validated on a world whose truth is known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from scipy import stats as sps

from core.artifacts import ArtifactSet
from core.explore import build_slate
from mesh.context import TENANT_KEY
from mesh.tls import PLAINTEXT, Transport
from training.world import World

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

DEFAULT_CONTEXT = -1
"""The context of a user the set does not know: its default row."""

_WORLD_USER = re.compile(r"(?:u|guest)(0|[1-9][0-9]*)")


def world_user(user_id: str) -> int | None:
    """The world's user row behind a simulated serve's user id (``u<row>``, or
    ``guest<row>`` for one served as unknown); None for another id."""
    found = _WORLD_USER.fullmatch(user_id)
    return int(found.group(1)) if found else None


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
    explore_pool: int = 0
    """0: exploration draws from the whole catalogue and the log holds marginal
    propensities; ``> 0``: the mesh's way, from this many candidates after the ranked ones,
    conditional propensities and supports logged (see the module docstring)."""

    def __post_init__(self) -> None:
        if not 0 <= self.explore_slots < self.slate <= self.candidates:
            raise ValueError("need 0 <= explore_slots < slate <= candidates")
        if self.explore_pool < 0 or (
            self.explore_pool
            and not (
                1 <= self.explore_slots <= self.explore_pool
                and self.ranked_slots + self.explore_pool <= self.candidates
            )
        ):
            raise ValueError(
                "the mesh's way needs 1 <= explore_slots <= explore_pool <= "
                "candidates - (slate - explore_slots)"
            )
        if not 0.0 <= self.unknown_share <= 1.0:
            raise ValueError("unknown_share must be in [0, 1]")

    @property
    def ranked_slots(self) -> int:
        """Slots filled by the ranker's order: ``slate - explore_slots``."""
        return self.slate - self.explore_slots


class Ranker:
    """An artifact set's heavy ranker over the whole catalogue, for one context at a time.

    ``head_weights`` (head name -> weight; heads not named weigh 0) replaces the set's
    ``ranker_head_weights`` in the score that orders the candidates.
    """

    def __init__(
        self, artifact_set: ArtifactSet, head_weights: Mapping[str, float] | None = None
    ) -> None:
        self.version = artifact_set.version
        self.users: F32 = np.asarray(artifact_set.open_array("user_features"), dtype=np.float32)
        self.items: F32 = np.asarray(artifact_set.open_array("item_features"), dtype=np.float32)
        self.default: F32 = self.users.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.heads = [str(h) for h in artifact_set.config["ranker_heads"]]
        if head_weights is None:
            weighting = artifact_set.config.get("ranker_head_weights", {})
            self.head_weights = {h: float(weighting.get(h, 1.0)) for h in self.heads}
        else:
            unknown = sorted(set(head_weights) - set(self.heads))
            if unknown:
                raise ValueError(f"no ranker head {unknown[0]!r}; the heads are {self.heads}")
            self.head_weights = {h: float(head_weights.get(h, 0.0)) for h in self.heads}
        self._weights = np.array([self.head_weights[h] for h in self.heads], dtype=np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(artifact_set.file("ranker")), options, providers=["CPUExecutionProvider"]
        )

    @property
    def n_users(self) -> int:
        return int(self.users.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.items.shape[0])

    def row(self, context: int) -> F32:
        """The user row of ``context``: the set's row ``context``, or its default row for
        :data:`DEFAULT_CONTEXT` (and any row the set does not have)."""
        return self.users[context] if 0 <= context < self.n_users else self.default

    def predict(self, context: int, items: I64 | None = None) -> F32:
        """The ranker's heads ``[len(items), H]`` for ``items`` (default: every item of the
        catalogue) shown to ``context``."""
        item_x = self.items if items is None else self.items[items]
        user_x = np.repeat(self.row(context)[None, :], item_x.shape[0], axis=0)
        out = self._session.run(None, {"user_features": user_x, "item_features": item_x})
        return np.asarray(out[0], dtype=np.float32)

    def score(self, heads: F32) -> F32:
        """The ordering score of :meth:`predict`'s rows: the weighted sum of the heads."""
        return np.asarray(heads @ self._weights, dtype=np.float32)

    def click(self, heads: F32) -> F32:
        """The click head's probability of :meth:`predict`'s rows."""
        return np.asarray(heads[:, self.heads.index("click")], dtype=np.float32)


@dataclass(frozen=True)
class ContextTable:
    """One context under a policy: every item's score, probability of being shown
    (:func:`inclusion_probabilities`) and the ranker's click probability."""

    score: F32
    inclusion: F64
    click: F32


class ServePolicy:
    """The simulated serve's policy: a :class:`Ranker` and the serve's shape.

    :meth:`table` scores the catalogue for a context; with ``cache`` the tables are kept
    (``n_items * 16`` bytes each), for callers that revisit contexts many times.
    """

    def __init__(self, ranker: Ranker, config: ServeConfig, cache: bool = False) -> None:
        if ranker.n_items < config.candidates + config.explore_slots:
            raise ValueError("the catalogue has fewer items than candidates plus exploration")
        self.ranker = ranker
        self.config = config
        self._cache: dict[int, ContextTable] | None = {} if cache else None

    def table(self, context: int) -> ContextTable:
        """``context``'s :class:`ContextTable` (:data:`DEFAULT_CONTEXT`: the default row)."""
        context = context if 0 <= context < self.ranker.n_users else DEFAULT_CONTEXT
        if self._cache is not None and context in self._cache:
            return self._cache[context]
        heads = self.ranker.predict(context)
        score = self.ranker.score(heads)
        table = ContextTable(
            score, inclusion_probabilities(score, self.config), self.ranker.click(heads)
        )
        if self._cache is not None:
            self._cache[context] = table
        return table


def ranks(score: F32) -> I64:
    """How many items the policy's order puts before each item: by score, best first,
    ties by the lower item id."""
    order = np.lexsort((np.arange(score.size), -score))
    rank = np.empty(score.size, dtype=np.int64)
    rank[order] = np.arange(score.size)
    return rank


def inclusion_probabilities(score: F32, config: ServeConfig) -> F64:
    """The probability that the serve shows each item to a context whose items the ranker
    scores ``score`` (every item of the catalogue): see the module docstring."""
    return _by_rank(int(score.size), config.candidates, config.ranked_slots, config.explore_slots)[
        ranks(score)
    ]


@lru_cache(maxsize=16)
def _by_rank(n_items: int, candidates: int, ranked: int, explore: int) -> F64:
    before = np.arange(n_items)
    drawn = candidates / n_items
    ranked_in = drawn * sps.hypergeom.cdf(ranked - 1, n_items - 1, before, candidates - 1)
    probability = np.asarray(
        ranked_in + (1.0 - ranked_in) * explore / (n_items - ranked), dtype=np.float64
    )
    probability.setflags(write=False)  # shared by every caller (lru_cache)
    return probability


@dataclass(frozen=True)
class Slates:
    """Answers of :func:`serve_slates`, one row per request."""

    items: I64
    """``[R, slate]``: the ranked slots, then the exploration slots."""
    propensities: F64
    """``[R, slate]``: each shown item's probability of being shown (``inclusion``)."""
    scores: F32
    """``[R, slate]``: the ranker's score of the ranked slots; 0 for exploration slots."""
    explored: NDArray[np.bool_]
    """``[R, slate]``: the slots exploration filled."""
    supports: I64 | None = None
    """The mesh's way only: ``[R, ranked + explore_pool]``, each answer's support (its
    ranked items, then its exploration pool)."""


def serve_slates(policy: ServePolicy, contexts: I64, rng: np.random.Generator) -> Slates:
    """Answer one request per entry of ``contexts`` (see the module docstring); requests of
    one context are answered together, so each context's catalogue is scored once."""
    config = policy.config
    n_items, ranked = policy.ranker.n_items, config.ranked_slots
    shape = (contexts.size, config.slate)
    items = np.empty(shape, dtype=np.int64)
    propensities = np.empty(shape, dtype=np.float64)
    scores = np.zeros(shape, dtype=np.float32)
    explored = np.zeros(shape, dtype=bool)
    explored[:, ranked:] = True
    pool = config.explore_pool
    supports = np.empty((contexts.size, ranked + pool), dtype=np.int64) if pool else None
    share = config.explore_slots / config.slate
    by_context = np.argsort(contexts, kind="stable")
    values, starts = np.unique(contexts[by_context], return_index=True)
    stops = [*starts[1:].tolist(), contexts.size]
    for context, start, stop in zip(values.tolist(), starts.tolist(), stops, strict=True):
        table = policy.table(int(context))
        for request in by_context[start:stop].tolist():
            cands = rng.choice(n_items, size=config.candidates, replace=False)
            if supports is not None:
                order = cands[np.lexsort((cands, -table.score[cands]))]
                slate = build_slate(order, config.slate, share, pool, rng)
                items[request] = slate.positions
                propensities[request] = slate.propensities
                explored[request] = slate.explored
                scores[request] = np.where(slate.explored, 0.0, table.score[slate.positions])
                supports[request] = slate.support
                continue
            best = cands[np.lexsort((cands, -table.score[cands]))[:ranked]]
            taken = set(best.tolist())
            extra: list[int] = []
            while len(extra) < config.explore_slots:
                item = int(rng.integers(0, n_items))
                if item not in taken:
                    taken.add(item)
                    extra.append(item)
            items[request, :ranked] = best
            items[request, ranked:] = extra
            scores[request, :ranked] = table.score[best]
            propensities[request] = table.inclusion[items[request]]
    return Slates(items, propensities, scores, explored, supports)


def _shape(config: ServeConfig) -> tuple[int, int, int, int]:
    return config.slate, config.candidates, config.explore_slots, config.explore_pool


def simulate_serve(
    artifact_set: ArtifactSet,
    world: World,
    config: ServeConfig,
    start_ms: int,
    policy: ServePolicy | None = None,
) -> list[events_pb2.Event]:
    """The events of ``config.requests`` answers of ``artifact_set`` to ``world``'s users,
    the first at ``start_ms``, in event-time order (see the module docstring). ``policy``:
    the serve's policy when the caller holds one (its ranker must be ``artifact_set``'s and
    its slate, candidates and exploration slots ``config``'s), e.g. to reuse cached tables.

    Raises:
        ValueError: ``policy`` serves another set or another slate shape; the world has
            fewer items than candidates plus exploration slots.
    """
    rng = np.random.default_rng(config.seed)
    if policy is None:
        policy = ServePolicy(Ranker(artifact_set), config)
    elif policy.ranker.version != artifact_set.version or _shape(policy.config) != _shape(config):
        raise ValueError("the policy serves another set or another slate shape")
    version = artifact_set.version
    truth_rows = rng.integers(0, world.config.n_users, size=config.requests)
    unknown = rng.random(config.requests) < config.unknown_share
    contexts = np.where(unknown, DEFAULT_CONTEXT, truth_rows).astype(np.int64)
    slates = serve_slates(policy, contexts, rng)
    shown, scores = slates.items, slates.scores

    pair_users = truth_rows.repeat(config.slate)
    clicked, converted = world.simulate(pair_users, shown.ravel(), seed=config.seed + 1)
    delays = rng.integers(*config.click_delay_ms, size=(config.requests * config.slate, 2))
    timed: list[tuple[int, int, events_pb2.Event]] = []
    for k in range(config.requests):
        at = start_ms + k * config.gap_ms
        user = f"guest{truth_rows[k]}" if unknown[k] else f"u{truth_rows[k]}"
        request = f"sim{config.seed}-r{k}"
        for slot in range(config.slate):
            flat = k * config.slate + slot
            item = int(shown[k, slot])
            explored = bool(slates.explored[k, slot])
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
                        propensity=float(slates.propensities[k, slot]),
                        score=float(scores[k, slot]),
                        source=common_pb2.SOURCE_EXPLORE if explored else common_pb2.SOURCE_ANN,
                        retrieval_version=version,
                        ranking_version=version,
                        support=(
                            slates.supports[k] if slot == 0 and slates.supports is not None else ()
                        ),
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
    *,
    transport: Transport = PLAINTEXT,
) -> tuple[int, int]:
    """Append ``events`` in order to ``tenant``'s log through the events service at
    ``address`` (over ``transport``: a tool's, ``ops``, names tenants to the events
    service), ``batch`` per ``Append``; returns (appended, duplicates).

    Raises:
        grpc.RpcError: the service refused a batch or could not be reached.
    """
    appended = duplicates = 0
    with transport.sync_channel(address, server="events") as channel:
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
