"""Ranking policies: service defaults, per-tenant file, per-request (variant) overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from recmesh.ranking.v1 import ranking_pb2

from mesh.errors import ConfigError, InvalidArgument
from services.ranking.policy import PolicyBook
from services.ranking.settings import RankingSettings


def book(tmp_path: Path, tenants: dict[str, Any]) -> PolicyBook:
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps({"tenants": tenants}))
    return PolicyBook.load(RankingSettings(policies=str(path)))


def test_without_a_file_every_tenant_gets_the_service_defaults() -> None:
    policies = PolicyBook.load(RankingSettings())
    policy = policies.resolve("anyone", ranking_pb2.RankRequest())
    assert (policy.candidates_keep, policy.prerank_keep, policy.heavy_keep) == (1000, 200, 50)
    assert policy.budgets == {
        "item_features": 0.010,
        "prerank": 0.005,
        "heavy": 0.025,
        "rerank": 0.005,
    }
    assert policy.diversity == "mmr" and policy.explore_share == 0.0


def test_a_tenant_entry_overrides_the_defaults(tmp_path: Path) -> None:
    policies = book(
        tmp_path,
        {
            "acme": {
                "prerank_keep": 150,
                "heavy_keep": 40,
                "diversity": "cap",
                "max_per_category": 2,
                "blocked_categories": [3, 7],
                "freshness_boost": 1,
                "budget_ms": {"heavy": 20},
            }
        },
    )
    acme = policies.resolve("acme", ranking_pb2.RankRequest())
    assert (acme.prerank_keep, acme.heavy_keep, acme.diversity) == (150, 40, "cap")
    assert acme.blocked_categories == frozenset({3, 7})
    assert acme.freshness_boost == 1.0
    assert acme.budgets["heavy"] == 0.020 and acme.budgets["rerank"] == 0.005
    assert policies.resolve("demo", ranking_pb2.RankRequest()).prerank_keep == 200


def test_the_request_overrides_the_tenant(tmp_path: Path) -> None:
    policies = book(tmp_path, {"acme": {"prerank_keep": 150, "mmr_lambda": 0.5}})
    request = ranking_pb2.RankRequest(
        prerank_keep=80,
        heavy_keep=20,
        candidates_keep=300,
        diversity=ranking_pb2.DIVERSITY_MMR,
        mmr_lambda=0.0,
        explore_share=0.2,
        stage_budget_ms={"heavy": 12.5},
    )
    policy = policies.resolve("acme", request)
    assert (policy.candidates_keep, policy.prerank_keep, policy.heavy_keep) == (300, 80, 20)
    assert policy.mmr_lambda == 0.0  # an explicit zero is not "unset"
    assert policy.explore_share == pytest.approx(0.2)
    assert policy.budgets["heavy"] == pytest.approx(0.0125)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prerank_keep": -1}, "prerank_keep"),
        ({"mmr_lambda": 1.5}, "mmr_lambda"),
        ({"explore_share": -0.1}, "explore_share"),
        ({"stage_budget_ms": {"warp": 3.0}}, "stage_budget_ms"),
        ({"stage_budget_ms": {"heavy": 0.0}}, "stage_budget_ms"),
        ({"stage_budget_ms": {"heavy": 5000.0}}, "stage_budget_ms"),
    ],
)
def test_an_out_of_range_override_names_its_field(
    request_fields: dict[str, Any], field: str
) -> None:
    policies = PolicyBook.load(RankingSettings())
    with pytest.raises(InvalidArgument) as error:
        policies.resolve("demo", ranking_pb2.RankRequest(**request_fields))
    assert error.value.field == field


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"prerank_kep": 100}, "unknown keys"),
        ({"prerank_keep": "100"}, "prerank_keep must be a int"),
        ({"prerank_keep": 0}, "prerank_keep must be >= 1"),
        ({"diversity": "shuffle"}, "diversity must be one of"),
        ({"blocked_categories": ["toys"]}, "blocked_categories"),
        ({"budget_ms": {"heavy": "soon"}}, "budget_ms"),
        ({"budget_ms": {"warp": 3}}, "unknown stage"),
    ],
)
def test_a_bad_tenant_entry_fails_at_start_up(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        book(tmp_path, {"acme": entry})


def test_an_unreadable_policy_file_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ranking policy file"):
        PolicyBook.load(RankingSettings(policies=str(tmp_path / "missing.json")))
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected"):
        PolicyBook.load(RankingSettings(policies=str(tmp_path / "bad.json")))
