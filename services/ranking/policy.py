"""What the cascade does for one request: counts, re-rank rules, exploration, budgets.

Three layers, each overriding the one before: the service settings, the tenant's entry
in the policy file (``RECMESH_RANKING_POLICIES``), and the request (experiment variant
params the gateway copies into ``RankRequest``). An interleaved request
(``RankRequest.interleave``) has two arms, each the request's policy with the arm's knobs
over it (:meth:`PolicyBook.arms`). The policy file is JSON; unknown keys are rejected so a
typo fails at start-up::

    {"tenants": {"acme": {"prerank_keep": 150, "heavy_keep": 40, "diversity": "cap",
                          "max_per_category": 2, "blocked_categories": [3, 7],
                          "freshness_boost": 0.05, "ctr_weight": 0.2, "explore_share": 0.1,
                          "budget_ms": {"heavy": 20}}}}
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recmesh.ranking.v1 import ranking_pb2

from mesh.errors import ConfigError, InvalidArgument
from services.ranking.budget import STAGES
from services.ranking.settings import RankingSettings

DIVERSITY_MODES = ("mmr", "cap", "none")
MAX_STAGE_BUDGET_MS = 1000.0

_DIVERSITY_FROM_PROTO = {
    ranking_pb2.DIVERSITY_MMR: "mmr",
    ranking_pb2.DIVERSITY_CATEGORY_CAP: "cap",
    ranking_pb2.DIVERSITY_NONE: "none",
}


@dataclass(frozen=True)
class RankPolicy:
    """The knobs of one request's cascade. Budgets in seconds by stage."""

    candidates_keep: int
    prerank_keep: int
    heavy_keep: int
    diversity: str
    mmr_lambda: float
    max_per_category: int
    blocked_categories: frozenset[int]
    freshness_boost: float
    ctr_weight: float
    explore_share: float
    explore_pool: int
    cold_start_share: float = 0.0
    budgets: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: RankingSettings) -> RankPolicy:
        """The service defaults."""
        return cls(
            candidates_keep=settings.candidates_keep,
            prerank_keep=settings.prerank_keep,
            heavy_keep=settings.heavy_keep,
            diversity=settings.diversity,
            mmr_lambda=settings.mmr_lambda,
            max_per_category=settings.max_per_category,
            blocked_categories=frozenset(),
            freshness_boost=settings.freshness_boost,
            ctr_weight=settings.ctr_weight,
            explore_share=settings.explore_share,
            explore_pool=settings.explore_pool,
            cold_start_share=settings.cold_start_share,
            budgets={
                "item_features": settings.feature_budget_s,
                "prerank": settings.prerank_budget_s,
                "heavy": settings.heavy_budget_s,
                "rerank": settings.rerank_budget_s,
            },
        )


def _problem(policy: RankPolicy) -> tuple[str, str] | None:
    """``(field, message)`` of the first out-of-range knob, or ``None``."""
    for name in ("candidates_keep", "prerank_keep", "heavy_keep", "explore_pool"):
        if getattr(policy, name) < 1:
            return name, f"{name} must be >= 1"
    if policy.diversity not in DIVERSITY_MODES:
        return "diversity", f"diversity must be one of {list(DIVERSITY_MODES)}"
    if not 0.0 <= policy.mmr_lambda <= 1.0:
        return "mmr_lambda", "mmr_lambda must be in [0, 1]"
    if policy.max_per_category < 0:
        return "max_per_category", "max_per_category must be >= 0"
    if not 0.0 <= policy.explore_share <= 1.0:
        return "explore_share", "explore_share must be in [0, 1]"
    if not 0.0 <= policy.cold_start_share <= 1.0:
        return "cold_start_share", "RECMESH_RANKING_COLD_START_SHARE must be in [0, 1]"
    if not 0.0 <= policy.ctr_weight < math.inf:
        return "ctr_weight", "ctr_weight must be a finite number >= 0"
    for stage, seconds in policy.budgets.items():
        if stage not in STAGES:
            return "stage_budget_ms", f"stage_budget_ms: unknown stage {stage!r} (stages: {STAGES})"
        if not 0.0 < seconds * 1000 <= MAX_STAGE_BUDGET_MS:
            return "stage_budget_ms", f"stage_budget_ms[{stage}] must be in (0, 1000]"
    return None


_TENANT_KEYS = {f.name for f in dataclasses.fields(RankPolicy)} - {"budgets"} | {"budget_ms"}


def _tenant_policy(base: RankPolicy, tenant: str, spec: Any, path: Path) -> RankPolicy:
    where = f"ranking policy file {path}: tenant {tenant!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = set(spec) - _TENANT_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_TENANT_KEYS)})"
        )
    changes: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "budget_ms":
            numbers = isinstance(value, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
            )
            if not numbers:
                raise ConfigError(f"{where}: budget_ms must map stage names to milliseconds")
            changes["budgets"] = {**base.budgets, **{s: v / 1000 for s, v in value.items()}}
        elif key == "blocked_categories":
            if not isinstance(value, list) or not all(isinstance(c, int) for c in value):
                raise ConfigError(f"{where}: blocked_categories must be a list of integers")
            changes[key] = frozenset(value)
        else:
            expected = type(getattr(base, key))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not expected:
                raise ConfigError(f"{where}: {key} must be a {expected.__name__}")
            changes[key] = value
    policy = dataclasses.replace(base, **changes)
    problem = _problem(policy)
    if problem is not None:
        raise ConfigError(f"{where}: {problem[1]}")
    return policy


@dataclass(frozen=True)
class Arm:
    """One ranker of a request: its policy and whether the heavy ranker orders its list.

    Attributes:
        key: the arm's name (an interleaving experiment's variant key); "" when the request
            is not interleaved.
        policy: the request's policy with the arm's overrides.
        heavy: whether the heavy ranker orders the arm's list (else pre-rank order).
    """

    key: str
    policy: RankPolicy
    heavy: bool


class PolicyBook:
    """Per-tenant policies over the service defaults.

    Raises:
        ConfigError: (from :meth:`load`) unreadable file, unknown key, out-of-range value.
    """

    def __init__(self, default: RankPolicy, tenants: Mapping[str, RankPolicy]) -> None:
        problem = _problem(default)
        if problem is not None:
            raise ConfigError(f"ranking settings: {problem[1]}")
        self.default = default
        self.tenants = dict(tenants)

    @classmethod
    def load(cls, settings: RankingSettings) -> PolicyBook:
        """The service defaults and, when ``settings.policies`` names a file, its tenants."""
        default = RankPolicy.from_settings(settings)
        if not settings.policies:
            return cls(default, {})
        path = Path(settings.policies)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"ranking policy file {path}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("tenants"), dict) or len(raw) != 1:
            raise ConfigError(f'ranking policy file {path}: expected {{"tenants": {{...}}}}')
        tenants = {
            name: _tenant_policy(default, name, spec, path) for name, spec in raw["tenants"].items()
        }
        return cls(default, tenants)

    def resolve(self, tenant: str, request: ranking_pb2.RankRequest) -> RankPolicy:
        """The tenant's policy with the request's overrides applied.

        Raises:
            InvalidArgument: an override is out of range; names the request field.
        """
        policy = self.tenants.get(tenant, self.default)
        changes: dict[str, Any] = {}
        for name in ("candidates_keep", "prerank_keep", "heavy_keep"):
            value = getattr(request, name)
            if value < 0:
                raise InvalidArgument(f"{name} must be >= 0", field=name)
            if value:
                changes[name] = value
        if request.diversity in _DIVERSITY_FROM_PROTO:
            changes["diversity"] = _DIVERSITY_FROM_PROTO[request.diversity]
        if request.HasField("mmr_lambda"):
            changes["mmr_lambda"] = request.mmr_lambda
        if request.HasField("explore_share"):
            changes["explore_share"] = request.explore_share
        if request.stage_budget_ms:
            changes["budgets"] = {
                **policy.budgets,
                **{stage: ms / 1000 for stage, ms in request.stage_budget_ms.items()},
            }
        if not changes:
            return policy
        resolved = dataclasses.replace(policy, **changes)
        problem = _problem(resolved)
        if problem is not None:
            raise InvalidArgument(problem[1], field=problem[0])
        return resolved

    def arms(self, policy: RankPolicy, request: ranking_pb2.RankRequest) -> tuple[Arm, ...]:
        """The request's rankers: one (key "") unless it is interleaved, then A and B, each
        ``policy`` (the request's, from :meth:`resolve`) with the arm's knobs over it.

        Raises:
            InvalidArgument: an arm's knob is out of range (field ``interleave.a.<knob>``),
                an arm has no key, or both have the same.
        """
        heavy = request.heavy_mode != ranking_pb2.HEAVY_MODE_OFF
        if not request.HasField("interleave"):
            return (Arm("", policy, heavy),)
        arms = []
        for name in ("a", "b"):
            spec: ranking_pb2.RankerArm = getattr(request.interleave, name)
            if not spec.key:
                raise InvalidArgument(
                    f"interleave.{name}.key must be non-empty", field=f"interleave.{name}.key"
                )
            arms.append(Arm(spec.key, _arm_policy(policy, spec, name), _arm_heavy(spec, heavy)))
        if arms[0].key == arms[1].key:
            raise InvalidArgument(
                "interleave.a.key and interleave.b.key must differ", field="interleave.b.key"
            )
        return tuple(arms)


def _arm_heavy(spec: ranking_pb2.RankerArm, default: bool) -> bool:
    if spec.heavy_mode == ranking_pb2.HEAVY_MODE_UNSPECIFIED:
        return default
    return bool(spec.heavy_mode != ranking_pb2.HEAVY_MODE_OFF)


def _arm_policy(policy: RankPolicy, spec: ranking_pb2.RankerArm, name: str) -> RankPolicy:
    """``policy`` with the arm's knobs (unset ones keep the policy's)."""
    changes: dict[str, Any] = {}
    for knob in ("prerank_keep", "heavy_keep"):
        value = getattr(spec, knob)
        if value < 0:
            raise InvalidArgument(f"{knob} must be >= 0", field=f"interleave.{name}.{knob}")
        if value:
            changes[knob] = value
    if spec.diversity in _DIVERSITY_FROM_PROTO:
        changes["diversity"] = _DIVERSITY_FROM_PROTO[spec.diversity]
    if spec.HasField("mmr_lambda"):
        changes["mmr_lambda"] = spec.mmr_lambda
    if spec.HasField("ctr_weight"):
        changes["ctr_weight"] = spec.ctr_weight
    if spec.HasField("freshness_boost"):
        changes["freshness_boost"] = spec.freshness_boost
    if not math.isfinite(changes.get("freshness_boost", 0.0)):
        raise InvalidArgument(
            "freshness_boost must be finite", field=f"interleave.{name}.freshness_boost"
        )
    resolved = dataclasses.replace(policy, **changes)
    problem = _problem(resolved)
    if problem is not None:
        raise InvalidArgument(problem[1], field=f"interleave.{name}.{problem[0]}")
    return resolved
