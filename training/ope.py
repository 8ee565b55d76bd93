"""``recmesh ope``: a candidate policy's CTR estimated off-policy from a tenant's event log.

Two kinds of log, two kinds of candidate; the log decides which:

* **The mesh's logs** (answers carrying a *support*, :mod:`core.explore`): the ranking
  service logs, for each answer, every item it could have shown (its ranked items, then its
  exploration pool) and each shown item's probability given that support (1 ranked,
  ``k / M`` explored). The candidate is a **final stage** (:class:`RerankPolicy`): over each
  answer's logged support it orders the items by an artifact set's heavy ranker (or keeps
  the logged order) and explores like the ranking service (``slate``, ``explore_share``,
  ``explore_pool``), so its probability of showing each support item is known exactly
  (:func:`core.explore.inclusion_probabilities`). Every item it can show had a positive
  logged probability, so its CTR *on the same candidates* is identified: what the answers
  would have clicked had the last stage been the candidate, retrieval and the earlier
  stages unchanged. Answers without a support (ranking did not answer, interleaved) are
  left out and counted. Given as a JSON file of :data:`RERANK_KEYS`, or an artifact set.
* **Simulated-serve logs** (``python -m training simulate-serve``, marginal propensities):
  the candidate is a simulated-serve policy (:class:`training.simulate.ServePolicy`): an
  artifact set's heavy ranker and the serve's shape (candidates drawn per answer, slate,
  exploration slots, head weights), given as an artifact set (a version under the root or
  a set's directory: the serve's default shape) or as a JSON file of :data:`POLICY_KEYS`.
  Each impression's context is its user as the candidate's set sees them (its row, or the
  default row for a user it does not know), for which
  :meth:`~training.simulate.ServePolicy.table` scores the whole catalogue: the candidate's
  probability of showing each item (``pi``) and its click head (the DR model ``qhat``). A
  log of propensities of 1 without supports (probabilities conditional on candidates it
  does not record) cannot be evaluated (``docs/experiments.md``, "Off-policy evaluation").

The log is read and joined with :mod:`training.log_data` (one example per impression,
labelled by the clicks that name its request and item).
:func:`core.experiments.ope.estimate_ctr` turns ``pi``, ``qhat`` and the logged
propensities into the naive, IPS, SNIPS and DR estimates (see there for the action space).
Answers with an impression of propensity 0 (ranking did not answer) are left out and
counted.

:func:`true_ctr` and :func:`true_rerank_ctr` compute a candidate's CTR exactly from the
world's ground truth (the set's world, regenerated from its manifest), for validating the
estimates.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from core import explore
from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from core.experiments.ope import DEFAULT_CLIP, OffPolicyEstimate, estimate_ctr
from mesh.errors import ConfigError
from training.log_data import LogExamples
from training.simulate import (
    DEFAULT_CONTEXT,
    ContextTable,
    Ranker,
    ServeConfig,
    ServePolicy,
    world_user,
)
from training.world import World

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

POLICY_KEYS = frozenset({"artifacts", "candidates", "slate", "explore_slots", "head_weights"})
"""Keys of a simulated-serve candidate's JSON file (every one optional)."""

RERANK_KEYS = frozenset(
    {"artifacts", "order", "head_weights", "slate", "explore_share", "explore_pool"}
)
"""Keys of a final-stage candidate's JSON file, for the mesh's logs (every one optional)."""

RERANK_SLATE = 10
"""A final-stage candidate's slate unless given: the gateway's default ``num_items``."""

CACHE_ENTRIES = 20_000_000
"""Most (context, item) entries a candidate caches: 320 MB of tables."""


class RerankPolicy:
    """A candidate final stage over an answer's logged support (see the module docstring).

    The support's items are ordered by ``ranker``'s score (best first, ties in the logged
    order), or kept in the logged order with ``keep_order``; then the first
    ``slate - k`` are shown and ``k`` drawn from the next ``explore_pool``, ``k`` as the
    ranking service computes it (:func:`core.explore.explore_slots`). ``ranker``'s click
    head is DR's model either way. ``cache``: keep each context's heads over the whole
    catalogue (for callers that revisit contexts many times).
    """

    def __init__(
        self,
        ranker: Ranker,
        *,
        slate: int,
        explore_share: float,
        explore_pool: int,
        keep_order: bool = False,
        cache: bool = False,
    ) -> None:
        if slate < 1 or explore_pool < 0 or not 0.0 <= explore_share <= 1.0:
            raise ValueError("need slate >= 1, explore_pool >= 0, explore_share in [0, 1]")
        self.ranker = ranker
        self.slate = slate
        self.explore_share = explore_share
        self.explore_pool = explore_pool
        self.keep_order = keep_order
        self._cache: dict[int, F32] | None = {} if cache else None

    def _heads(self, context: int, support: I64) -> F32:
        if self._cache is None:
            return self.ranker.predict(context, support)
        context = context if 0 <= context < self.ranker.n_users else DEFAULT_CONTEXT
        if context not in self._cache:
            self._cache[context] = self.ranker.predict(context)
        return self._cache[context][support]

    def table(self, context: int, support: I64) -> ContextTable:
        """Per entry of ``support``: the ranker's score, the candidate's probability of
        showing it (summing to ``min(slate, len(support))``) and the click head."""
        heads = self._heads(context, support)
        score = self.ranker.score(heads)
        order = np.arange(support.size) if self.keep_order else np.argsort(-score, kind="stable")
        inclusion = np.empty(support.size, dtype=np.float64)
        inclusion[order] = explore.inclusion_probabilities(
            support.size, self.slate, self.explore_share, self.explore_pool
        )
        return ContextTable(score, inclusion, self.ranker.click(heads))


PolicyT = TypeVar("PolicyT", ServePolicy, RerankPolicy)


@dataclass(frozen=True)
class Candidate(Generic[PolicyT]):
    """A candidate policy and what names it."""

    policy: PolicyT
    artifact_set: ArtifactSet
    description: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateSpec:
    """What ``--policy`` names, read but not built: the artifact set and the parameters."""

    name: str
    artifact_set: ArtifactSet
    params: dict[str, Any]


def read_spec(spec: str, root: Path) -> CandidateSpec:
    """``spec``: a set's directory, a version under ``root``, or a JSON file of parameters
    whose ``artifacts`` (a directory or a version under ``root``, default ``current``)
    names the set.

    Raises:
        ConfigError: the file does not parse or names no set.
        ArtifactError: the set is missing or broken.
    """
    path = Path(spec)
    params: dict[str, Any] = {}
    if path.is_file():
        try:
            params = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--policy {spec}: not a JSON file of parameters: {exc}") from exc
        if not isinstance(params, dict):
            raise ConfigError(f"--policy {spec}: must hold a JSON object")
        where = params.get("artifacts")
        set_path = _set_path(str(where), root, path.parent) if where else resolve_current(root)
    else:
        set_path = _set_path(spec, root, Path.cwd())
    return CandidateSpec(spec, load_artifact_set(set_path, verify=True), params)


def _check_keys(spec: CandidateSpec, allowed: frozenset[str], kind: str) -> None:
    unknown = sorted(set(spec.params) - allowed)
    if unknown:
        raise ConfigError(
            f"--policy {spec.name}: unknown key {unknown[0]!r} for {kind}; "
            f"the keys are {sorted(allowed)}"
        )


def load_candidate(
    spec: str | CandidateSpec, root: Path, cache: bool = False
) -> Candidate[ServePolicy]:
    """The simulated-serve candidate ``spec`` names (:func:`read_spec`), its JSON keys any
    of :data:`POLICY_KEYS`. ``cache``: keep each context's table
    (:class:`~training.simulate.ServePolicy`) while the catalogue times the users is at most
    :data:`CACHE_ENTRIES`, for callers that visit each context more than once.

    ``candidates``, ``slate``, ``explore_slots`` (the serve's shape; defaults those of
    :class:`~training.simulate.ServeConfig`) and ``head_weights`` (head -> weight of the
    ordering score; heads not named weigh 0; default the set's ``ranker_head_weights``).

    Raises:
        ConfigError: the file does not parse, has another key or a bad value, or names no set.
        ArtifactError: the set is missing or broken.
    """
    spec = read_spec(spec, root) if isinstance(spec, str) else spec
    _check_keys(spec, POLICY_KEYS, "a simulated-serve log's candidate")
    params, artifact_set = spec.params, spec.artifact_set
    defaults = ServeConfig()
    try:
        config = ServeConfig(
            slate=int(params.get("slate", defaults.slate)),
            candidates=int(params.get("candidates", defaults.candidates)),
            explore_slots=int(params.get("explore_slots", defaults.explore_slots)),
        )
        ranker = _ranker(artifact_set, params.get("head_weights"))
        policy = ServePolicy(ranker, config, cache=cache and _fits(ranker))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--policy {spec.name}: {exc}") from exc
    description = {
        "artifacts": artifact_set.version,
        "candidates": config.candidates,
        "slate": config.slate,
        "explore_slots": config.explore_slots,
        "head_weights": ranker.head_weights,
    }
    return Candidate(policy, artifact_set, description)


def load_rerank_candidate(
    spec: str | CandidateSpec, root: Path, cache: bool = False
) -> Candidate[RerankPolicy]:
    """The final-stage candidate ``spec`` names (:func:`read_spec`), its JSON keys any of
    :data:`RERANK_KEYS`: ``order`` (``"ranker"``, the default: by the set's heavy ranker;
    ``"logged"``: the ranking service's own order), ``head_weights`` (as for
    :func:`load_candidate`), ``slate`` (default 10), ``explore_share`` and ``explore_pool``
    (the ranking service's defaults, :data:`core.explore.DEFAULT_SHARE` and
    :data:`~core.explore.DEFAULT_POOL`). ``cache``: as for :func:`load_candidate`.

    Raises:
        ConfigError: the file does not parse, has another key or a bad value, or names no set.
        ArtifactError: the set is missing or broken.
    """
    spec = read_spec(spec, root) if isinstance(spec, str) else spec
    _check_keys(
        spec,
        RERANK_KEYS,
        "a final stage over logged supports (the log's answers carry supports: it is the "
        "mesh's log, so the candidate is a final stage, not a simulated serve)",
    )
    params, artifact_set = spec.params, spec.artifact_set
    order = params.get("order", "ranker")
    try:
        if order not in ("ranker", "logged"):
            raise ValueError('order must be "ranker" or "logged"')
        ranker = _ranker(artifact_set, params.get("head_weights"))
        policy = RerankPolicy(
            ranker,
            slate=int(params.get("slate", RERANK_SLATE)),
            explore_share=float(params.get("explore_share", explore.DEFAULT_SHARE)),
            explore_pool=int(params.get("explore_pool", explore.DEFAULT_POOL)),
            keep_order=order == "logged",
            cache=cache and _fits(ranker),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--policy {spec.name}: {exc}") from exc
    description = {
        "artifacts": artifact_set.version,
        "order": order,
        "slate": policy.slate,
        "explore_share": policy.explore_share,
        "explore_pool": policy.explore_pool,
        "head_weights": ranker.head_weights,
    }
    return Candidate(policy, artifact_set, description)


def _fits(ranker: Ranker) -> bool:
    """Whether every context's table of ``ranker`` fits in :data:`CACHE_ENTRIES`."""
    return (ranker.n_users + 1) * ranker.n_items <= CACHE_ENTRIES


def _ranker(artifact_set: ArtifactSet, weights: object) -> Ranker:
    if weights is not None and not isinstance(weights, dict):
        raise ValueError("head_weights must be an object of head -> weight")
    return Ranker(artifact_set, weights)


def _set_path(name: str, root: Path, relative_to: Path) -> Path:
    for path in (Path(name), relative_to / name, root / name):
        if path.is_dir():
            return path
    raise ConfigError(f"no artifact set {name!r} (neither a directory nor a version under {root})")


@dataclass(frozen=True)
class LoggedImpressions:
    """A log's impressions as the estimators read them, one entry per impression.

    Attributes:
        contexts: the user's row in the candidate's set, or ``DEFAULT_CONTEXT``.
        items: the item shown.
        clicks: 1 when a click names the impression's request and item.
        propensities: the logged propensity.
        requests: the answer, as codes ``0 .. R - 1``.
        skipped_requests: answers left out: one of their impressions has propensity 0
            (or, for a log of supports, the answer has none or names an item outside the
            candidate's set).
    """

    contexts: I64
    items: I64
    clicks: F64
    propensities: F64
    requests: I64
    skipped_requests: int = 0
    supports: list[I64] | None = None
    """Per answer code, the answer's logged support (mesh logs); None otherwise."""
    world_users: I64 | None = None
    """Per impression, the world's user behind its id (``u<row>``/``guest<row>``; -1 for
    another id): what a simulated log's ground truth is looked up by."""

    @classmethod
    def from_examples(cls, examples: LogExamples) -> LoggedImpressions:
        """The impressions of ``examples`` (:mod:`training.log_data`), whose ``user_rows``
        index the candidate's set; answers with a propensity of 0 are skipped."""
        names, codes = np.unique(np.asarray(examples.request_ids), return_inverse=True)
        return cls._kept(examples, codes, np.zeros(names.size, dtype=bool))

    @classmethod
    def from_supported(cls, examples: LogExamples, n_items: int, slate: int) -> LoggedImpressions:
        """The impressions of the answers of ``examples`` that carry a support (the mesh's
        logs) of at least ``slate`` items (the candidate's), every support item below
        ``n_items`` (the candidate's catalogue), every propensity positive, and consistent
        with their support (every shown item in it, those of propensity 1 at its head);
        the other answers are skipped."""
        names, codes = np.unique(np.asarray(examples.request_ids), return_inverse=True)
        skip = np.zeros(names.size, dtype=bool)
        for code, name in enumerate(names.tolist()):
            found = examples.supports.get(str(name))
            skip[code] = found is None or found.size < max(1, slate) or int(found.max()) >= n_items
        certain = examples.propensities >= 1.0
        heads = np.bincount(codes, weights=certain, minlength=names.size).astype(np.int64)
        for row, code in enumerate(codes.tolist()):
            if skip[code]:
                continue
            support = examples.supports[str(names[code])]
            shown_from = support[: heads[code]] if certain[row] else support
            if not np.any(shown_from == examples.items[row]):
                skip[code] = True
        kept = cls._kept(examples, codes, skip)
        supports = [examples.supports[str(n)] for n, s in zip(names, skip, strict=True) if not s]
        users = np.array(
            [-1 if (world := world_user(u)) is None else world for u in examples.user_ids],
            dtype=np.int64,
        )
        keep = ~skip[codes] & (examples.propensities > 0)
        return dataclasses.replace(kept, supports=supports, world_users=users[keep])

    @classmethod
    def _kept(cls, examples: LogExamples, codes: I64, skip: NDArray[np.bool_]) -> LoggedImpressions:
        """The impressions of the answers not in ``skip`` (by answer code) nor holding an
        impression of propensity 0, their answers numbered anew."""
        propensities = examples.propensities.astype(np.float64)
        skip = skip.copy()
        skip[codes[propensities <= 0]] = True
        keep = ~skip[codes]
        _, kept_codes = np.unique(codes[keep], return_inverse=True)
        return cls(
            contexts=np.where(examples.user_rows < 0, DEFAULT_CONTEXT, examples.user_rows)[keep],
            items=examples.items[keep],
            clicks=examples.labels[keep, 0].astype(np.float64),
            propensities=propensities[keep],
            requests=kept_codes.astype(np.int64),
            skipped_requests=int(skip.sum()),
        )


def estimate(
    log: LoggedImpressions,
    policy: ServePolicy | RerankPolicy,
    clip: float = DEFAULT_CLIP,
    alpha: float = 0.05,
) -> OffPolicyEstimate:
    """:func:`evaluate_rerank` for a final stage, :func:`evaluate` for a simulated serve."""
    if isinstance(policy, RerankPolicy):
        return evaluate_rerank(log, policy, clip=clip, alpha=alpha)
    return evaluate(log, policy, clip=clip, alpha=alpha)


def evaluate(
    log: LoggedImpressions,
    policy: ServePolicy,
    clip: float = DEFAULT_CLIP,
    alpha: float = 0.05,
) -> OffPolicyEstimate:
    """The candidate ``policy``'s CTR estimated from ``log``
    (:func:`core.experiments.ope.estimate_ctr`), its ranker's click head as DR's model.

    Raises:
        ValueError: see :func:`~core.experiments.ope.estimate_ctr` (fewer than two answers,
            a propensity out of ``(0, 1]``...).
    """
    target = np.empty(log.items.size, dtype=np.float64)
    predicted = np.empty(log.items.size, dtype=np.float64)
    context_value: dict[int, float] = {}
    by_context = np.argsort(log.contexts, kind="stable")
    values, starts = np.unique(log.contexts[by_context], return_index=True)
    stops = [*starts[1:].tolist(), log.contexts.size]
    for context, start, stop in zip(values.tolist(), starts.tolist(), stops, strict=True):
        table = policy.table(int(context))
        rows = by_context[start:stop]
        target[rows] = table.inclusion[log.items[rows]]
        predicted[rows] = table.click[log.items[rows]]
        context_value[int(context)] = float(table.inclusion @ table.click.astype(np.float64))
    n_requests = int(log.requests.max()) + 1 if log.requests.size else 0
    request_context = np.empty(n_requests, dtype=np.int64)
    request_context[log.requests] = log.contexts
    direct = np.array([context_value[int(c)] for c in request_context], dtype=np.float64)
    return estimate_ctr(
        clicks=log.clicks,
        target=target,
        logged=log.propensities,
        requests=log.requests,
        slate_size=policy.config.slate,
        predicted=predicted,
        direct=direct,
        clip=clip,
        alpha=alpha,
    )


def evaluate_rerank(
    log: LoggedImpressions,
    policy: RerankPolicy,
    clip: float = DEFAULT_CLIP,
    alpha: float = 0.05,
) -> OffPolicyEstimate:
    """The final-stage candidate ``policy``'s CTR estimated from a log of supports
    (:meth:`LoggedImpressions.from_supported`), its ranker's click head as DR's model, the
    direct method summed over each answer's support.

    Raises:
        ValueError: the log holds no supports; an answer's support is shorter than the
            candidate's slate (:meth:`LoggedImpressions.from_supported` leaves those out);
            see also :func:`~core.experiments.ope.estimate_ctr`.
    """
    if log.supports is None:
        raise ValueError("the log holds no supports: not a log of the mesh's answers")
    target = np.zeros(log.items.size, dtype=np.float64)
    predicted = np.zeros(log.items.size, dtype=np.float64)
    direct = np.empty(len(log.supports), dtype=np.float64)
    for request, support, rows, context in _answers(log):
        if support.size < policy.slate:
            raise ValueError(
                f"an answer's support has {support.size} items, fewer than the candidate's "
                f"slate of {policy.slate}"
            )
        table = policy.table(context, support)
        where = {int(item): j for j, item in enumerate(support.tolist())}
        for row in rows.tolist():
            j = where.get(int(log.items[row]))
            if j is not None:
                target[row] = table.inclusion[j]
                predicted[row] = table.click[j]
        direct[request] = float(table.inclusion @ table.click.astype(np.float64))
    return estimate_ctr(
        clicks=log.clicks,
        target=target,
        logged=log.propensities,
        requests=log.requests,
        slate_size=policy.slate,
        predicted=predicted,
        direct=direct,
        clip=clip,
        alpha=alpha,
    )


def _answers(log: LoggedImpressions) -> list[tuple[int, I64, I64, int]]:
    """Per answer code: the code, its support, its impressions' rows and its context."""
    assert log.supports is not None
    by_request = np.argsort(log.requests, kind="stable")
    codes, starts = np.unique(log.requests[by_request], return_index=True)
    stops = [*starts[1:].tolist(), log.requests.size]
    return [
        (code, log.supports[code], by_request[start:stop], int(log.contexts[by_request[start]]))
        for code, start, stop in zip(codes.tolist(), starts.tolist(), stops, strict=True)
    ]


def true_rerank_ctr(log: LoggedImpressions, policy: RerankPolicy, world: World) -> float:
    """The final-stage candidate's expected clicks per impression on the answers of ``log``
    (their users and supports), from the world's ground truth: the mean over the answers of
    ``sum_i pi(i | x) P(click | user, i) / slate``, exact given the answers.

    Raises:
        ValueError: the log holds no supports, or an answer's user is not a world user.
    """
    if log.supports is None or log.world_users is None:
        raise ValueError("the log holds no supports: not a log of the mesh's answers")
    values = []
    clicks: dict[int, F64] = {}
    for _, support, rows, context in _answers(log):
        user = int(log.world_users[rows[0]])
        if user < 0:
            raise ValueError("an answer's user is not one of the world's (u<row>/guest<row>)")
        if user not in clicks:
            clicks[user] = world.oracle_scores(np.array([user])).click[0].astype(np.float64)
        values.append(float(policy.table(context, support).inclusion @ clicks[user][support]))
    return float(np.mean(values)) / policy.slate


def true_ctr(policy: ServePolicy, world: World, unknown_share: float) -> float:
    """The policy's expected clicks per impression on the simulated serve's traffic (world
    users drawn uniformly, a share ``unknown_share`` of them served as unknown users), from
    the world's ground truth: ``E_u [sum_i pi(i | x_u) P(click | u, i)] / slate``, exact.

    Scores the catalogue once per world user and once for the default row."""
    slate = policy.config.slate
    n_users = world.config.n_users
    unknown = policy.table(DEFAULT_CONTEXT).inclusion
    known = np.empty(n_users, dtype=np.float64)
    as_unknown = np.empty(n_users, dtype=np.float64)
    for user in range(n_users):
        truth = world.oracle_scores(np.array([user])).click[0].astype(np.float64)
        context = user if user < policy.ranker.n_users else DEFAULT_CONTEXT
        known[user] = policy.table(context).inclusion @ truth
        as_unknown[user] = unknown @ truth
    return float(((1.0 - unknown_share) * known.mean() + unknown_share * as_unknown.mean()) / slate)


def to_json(estimate: OffPolicyEstimate) -> dict[str, Any]:
    """``estimate`` as a JSON-ready dict: per estimator ``{estimate, se, low, high}``."""
    out: dict[str, Any] = {}
    for name in ("naive", "ips", "snips", "dr"):
        interval = getattr(estimate, name)
        out[name] = (
            None
            if interval is None
            else {
                "estimate": interval.estimate,
                "se": interval.standard_error,
                "low": interval.low,
                "high": interval.high,
            }
        )
    for name in (
        "effective_sample_size",
        "requests",
        "impressions",
        "clicks",
        "clip",
        "clipped",
        "max_weight",
        "mean_weight",
    ):
        out[name] = getattr(estimate, name)
    return out


def format_estimate(estimate: OffPolicyEstimate, alpha: float = 0.05) -> str:
    """A table of the estimates and their intervals, and the weights' summary."""
    level = f"{100 * (1 - alpha):g} % CI"
    lines = [f"{'estimator':<10}{'CTR':>9}  {level:<19}{'se':>9}"]
    for name, label in (("naive", "naive"), ("ips", "IPS"), ("snips", "SNIPS"), ("dr", "DR")):
        interval = getattr(estimate, name)
        if interval is None:
            continue
        lines.append(
            f"{label:<10}{interval.estimate:>9.4f}  "
            f"[{interval.low:.4f}, {interval.high:.4f}]{interval.standard_error:>10.4f}"
        )
    lines.append(
        f"effective sample size {estimate.effective_sample_size:.0f} of "
        f"{estimate.impressions} impressions; weights: mean {estimate.mean_weight:.3f}, "
        f"max {estimate.max_weight:.1f}, {estimate.clipped} clipped at {estimate.clip:g}"
    )
    return "\n".join(lines)
