"""``recmesh ope``: a candidate policy's CTR estimated off-policy from a tenant's event log.

The candidate is a simulated-serve policy (:class:`training.simulate.ServePolicy`): an
artifact set's heavy ranker and the serve's shape (candidates drawn per answer, slate,
exploration slots, head weights), given as an artifact set (a version under the root or a
set's directory: the serve's default shape) or as a JSON file of parameters
(:func:`load_candidate`). The log is read and joined with :mod:`training.log_data` (one
example per impression, labelled by the clicks that name its request and item); each
impression's context is its user as the candidate's set sees them (its row, or the default
row for a user it does not know), for which :meth:`~training.simulate.ServePolicy.table`
scores the whole catalogue with the candidate's ranker: the candidate's probability of
showing each item (``pi``) and its click head (the DR model ``qhat``).
:func:`core.experiments.ope.estimate_ctr` turns them into the naive, IPS, SNIPS and DR
estimates (see there for the action space and why it is identified).

The logged propensities must be the logging policy's probability of showing the item to
that context, marginal over what the log does not record: what ``simulate-serve`` logs.
The mesh's ranking service logs a probability conditional on the candidate list retrieval
gave (1 for every ranked slot), which this estimate cannot use (``docs/experiments.md``,
"Off-policy evaluation"). Answers with an impression of propensity 0 (ranking did not
answer) are left out and counted.

:func:`true_ctr` is the candidate's CTR computed exactly from the world's ground truth
(the set's world, regenerated from its manifest), for validating the estimates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.artifacts import ArtifactSet, load_artifact_set, resolve_current
from core.experiments.ope import DEFAULT_CLIP, OffPolicyEstimate, estimate_ctr
from mesh.errors import ConfigError
from training.log_data import LogExamples
from training.simulate import DEFAULT_CONTEXT, Ranker, ServeConfig, ServePolicy
from training.world import World

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

POLICY_KEYS = frozenset({"artifacts", "candidates", "slate", "explore_slots", "head_weights"})
"""Keys of a candidate policy's JSON file (every one optional)."""

CACHE_ENTRIES = 20_000_000
"""Most (context, item) entries :func:`load_candidate` caches: 320 MB of tables."""


@dataclass(frozen=True)
class Candidate:
    """A candidate policy and what names it."""

    policy: ServePolicy
    artifact_set: ArtifactSet
    description: dict[str, Any] = field(default_factory=dict)


def load_candidate(spec: str, root: Path, cache: bool = False) -> Candidate:
    """The candidate policy ``spec`` names: a set's directory, a version under ``root``, or
    a JSON file with any of :data:`POLICY_KEYS`. ``cache``: keep each context's table
    (:class:`~training.simulate.ServePolicy`) while the catalogue times the users is at most
    :data:`CACHE_ENTRIES`, for callers that visit each context more than once.

    ``artifacts`` (a directory or a version under ``root``; default ``current``),
    ``candidates``, ``slate``, ``explore_slots`` (the serve's shape; defaults those of
    :class:`~training.simulate.ServeConfig`) and ``head_weights`` (head -> weight of the
    ordering score; heads not named weigh 0; default the set's ``ranker_head_weights``).

    Raises:
        ConfigError: the file does not parse, has another key or a bad value, or names no set.
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
        unknown = sorted(set(params) - POLICY_KEYS)
        if unknown:
            raise ConfigError(f"--policy {spec}: unknown key {unknown[0]!r}")
        where = params.get("artifacts")
        set_path = _set_path(str(where), root, path.parent) if where else resolve_current(root)
    else:
        set_path = _set_path(spec, root, Path.cwd())
    artifact_set = load_artifact_set(set_path, verify=True)
    defaults = ServeConfig()
    weights = params.get("head_weights")
    try:
        config = ServeConfig(
            slate=int(params.get("slate", defaults.slate)),
            candidates=int(params.get("candidates", defaults.candidates)),
            explore_slots=int(params.get("explore_slots", defaults.explore_slots)),
        )
        if weights is not None and not isinstance(weights, dict):
            raise ValueError("head_weights must be an object of head -> weight")
        ranker = Ranker(artifact_set, weights)
        fits = (ranker.n_users + 1) * ranker.n_items <= CACHE_ENTRIES
        policy = ServePolicy(ranker, config, cache=cache and fits)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--policy {spec}: {exc}") from exc
    description = {
        "artifacts": artifact_set.version,
        "candidates": config.candidates,
        "slate": config.slate,
        "explore_slots": config.explore_slots,
        "head_weights": ranker.head_weights,
    }
    return Candidate(policy, artifact_set, description)


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
        skipped_requests: answers left out: one of their impressions has propensity 0.
    """

    contexts: I64
    items: I64
    clicks: F64
    propensities: F64
    requests: I64
    skipped_requests: int = 0

    @classmethod
    def from_examples(cls, examples: LogExamples) -> LoggedImpressions:
        """The impressions of ``examples`` (:mod:`training.log_data`), whose ``user_rows``
        index the candidate's set."""
        names, codes = np.unique(np.asarray(examples.request_ids), return_inverse=True)
        propensities = examples.propensities.astype(np.float64)
        unknown = np.zeros(names.size, dtype=bool)
        unknown[codes[propensities <= 0]] = True
        keep = ~unknown[codes]
        _, kept_codes = np.unique(codes[keep], return_inverse=True)
        return cls(
            contexts=np.where(examples.user_rows < 0, DEFAULT_CONTEXT, examples.user_rows)[keep],
            items=examples.items[keep],
            clicks=examples.labels[keep, 0].astype(np.float64),
            propensities=propensities[keep],
            requests=kept_codes.astype(np.int64),
            skipped_requests=int(unknown.sum()),
        )


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
