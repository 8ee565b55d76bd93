"""What an experiment variant's params do to a request: the knobs of the funnel.

Variants carry ``params`` (``config/experiments.json``, :mod:`core.experiments.book`); the
gateway merges those of a request's assignments and turns them into the retrieval size and
the ``RankRequest`` fields here, so the funnel only applies :class:`Knobs`. An
interleaving experiment's assignment carries its two arms instead of params
(:func:`interleave_arms`): ranking then merges the two rankings by team draft.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from recmesh.experiment.v1 import experiment_pb2
from recmesh.ranking.v1 import ranking_pb2

log = logging.getLogger(__name__)


@dataclass
class Knobs:
    """Pipeline knobs an experiment variant may set.

    ``retrieval.k`` and ``ranking.heavy`` (``off``) as before; the ``ranking.*`` params below
    become ``RankRequest`` fields (ranking checks them against its tenant policy):
    ``ranking.candidates``, ``ranking.prerank_keep``, ``ranking.heavy_keep`` (counts),
    ``ranking.diversity`` (``mmr``, ``cap`` or ``none``), ``ranking.mmr_lambda`` and
    ``ranking.explore_share`` (in [0, 1]), ``ranking.budget_ms.<stage>`` (stage budget in
    ms). A ``ranking.*`` value that does not parse or is out of range is ignored with a
    warning, so a bad experiment file cannot fail requests.
    """

    ann_k: int = 0
    heavy: int = ranking_pb2.HEAVY_MODE_UNSPECIFIED
    candidates_keep: int = 0
    prerank_keep: int = 0
    heavy_keep: int = 0
    diversity: int = ranking_pb2.DIVERSITY_UNSPECIFIED
    mmr_lambda: float | None = None
    explore_share: float | None = None
    stage_budget_ms: dict[str, float] = field(default_factory=dict)
    interleave: ranking_pb2.Interleave | None = None
    """The two rankers of an interleaving experiment the request is in (or None)."""

    @classmethod
    def from_variants(cls, params: Mapping[str, str]) -> Knobs:
        """The knobs the merged params of a request's variants set; a ``ranking.*``
        value that does not parse or is out of range is logged and ignored."""
        counts = {
            "ranking.candidates": "candidates_keep",
            "ranking.prerank_keep": "prerank_keep",
            "ranking.heavy_keep": "heavy_keep",
        }
        diversity = {
            "mmr": ranking_pb2.DIVERSITY_MMR,
            "cap": ranking_pb2.DIVERSITY_CATEGORY_CAP,
            "none": ranking_pb2.DIVERSITY_NONE,
        }
        knobs = cls()
        if "retrieval.k" in params:
            knobs.ann_k = int(params["retrieval.k"])
        if params.get("ranking.heavy") == "off":
            knobs.heavy = ranking_pb2.HEAVY_MODE_OFF
        for key, value in params.items():
            try:
                if key in counts:
                    count = int(value)
                    if count < 1:
                        raise ValueError("must be >= 1")
                    setattr(knobs, counts[key], count)
                elif key == "ranking.diversity":
                    knobs.diversity = diversity[value]
                elif key in ("ranking.mmr_lambda", "ranking.explore_share"):
                    share = float(value)
                    if not 0.0 <= share <= 1.0:
                        raise ValueError("must be in [0, 1]")
                    setattr(knobs, key.removeprefix("ranking."), share)
                elif key.startswith("ranking.budget_ms."):
                    ms = float(value)
                    if not 0.0 < ms <= 1000.0:
                        raise ValueError("must be in (0, 1000]")
                    knobs.stage_budget_ms[key.removeprefix("ranking.budget_ms.")] = ms
            except (ValueError, KeyError) as exc:
                log.warning("experiment param %s=%r ignored: %s", key, value, exc)
        return knobs

    def rank_fields(self) -> dict[str, Any]:
        """The ``RankRequest`` fields the ``ranking.*`` knobs set (unset ones left out)."""
        fields: dict[str, Any] = {
            "candidates_keep": self.candidates_keep,
            "prerank_keep": self.prerank_keep,
            "heavy_keep": self.heavy_keep,
            "diversity": self.diversity,
            "stage_budget_ms": self.stage_budget_ms,
        }
        if self.mmr_lambda is not None:
            fields["mmr_lambda"] = self.mmr_lambda
        if self.explore_share is not None:
            fields["explore_share"] = self.explore_share
        if self.interleave is not None:
            fields["interleave"] = self.interleave
        return fields


_DIVERSITY = {
    "mmr": ranking_pb2.DIVERSITY_MMR,
    "cap": ranking_pb2.DIVERSITY_CATEGORY_CAP,
    "none": ranking_pb2.DIVERSITY_NONE,
}


def interleave_arms(
    assignments: Sequence[experiment_pb2.Assignment],
) -> ranking_pb2.Interleave | None:
    """The ``RankRequest.interleave`` of the first assignment with two arms (an
    interleaving experiment; the book keeps those from overlapping), or None.

    Each arm's params become its ``RankerArm`` knobs (``ranking.heavy``,
    ``ranking.prerank_keep``, ``ranking.heavy_keep``, ``ranking.diversity``,
    ``ranking.mmr_lambda``, ``ranking.ctr_weight``, ``ranking.freshness_boost``); a value
    that does not parse is logged and ignored, as for :class:`Knobs`.
    """
    for assignment in assignments:
        if len(assignment.arms) == 2:
            a, b = (_arm(arm) for arm in assignment.arms)
            return ranking_pb2.Interleave(a=a, b=b)
    return None


def _arm(spec: experiment_pb2.Arm) -> ranking_pb2.RankerArm:
    arm = ranking_pb2.RankerArm(key=spec.key)
    for key, value in spec.params.items():
        try:
            if key == "ranking.heavy":
                heavy = {"on": ranking_pb2.HEAVY_MODE_ON, "off": ranking_pb2.HEAVY_MODE_OFF}
                arm.heavy_mode = heavy[value]
            elif key in ("ranking.prerank_keep", "ranking.heavy_keep"):
                count = int(value)
                if count < 1:
                    raise ValueError("must be >= 1")
                setattr(arm, key.removeprefix("ranking."), count)
            elif key == "ranking.diversity":
                arm.diversity = _DIVERSITY[value]
            elif key in ("ranking.mmr_lambda", "ranking.ctr_weight", "ranking.freshness_boost"):
                setattr(arm, key.removeprefix("ranking."), float(value))
            else:
                raise KeyError("not an arm knob")
        except (ValueError, KeyError) as exc:
            log.warning("interleaving arm %s: param %s=%r ignored: %s", spec.key, key, value, exc)
    return arm
