"""Interleaving experiments in the book: strict validation, and assignment with both arms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.experiments.assign import assign, control_params
from core.experiments.book import ExperimentBook, load_experiments
from core.experiments.interleaving import INTERLEAVED
from mesh.errors import ConfigError


def _interleave(key: str = "rankers", **overrides: Any) -> dict[str, Any]:
    experiment: dict[str, Any] = {
        "key": key,
        "type": "interleave",
        "hash_version": 2,
        "variants": [
            {"key": "heavy", "params": {"ranking.heavy": "on"}},
            {"key": "light", "params": {"ranking.heavy": "off", "ranking.mmr_lambda": "0.5"}},
        ],
    }
    experiment.update(overrides)
    return experiment


def _book(tmp_path: Path, *experiments: dict[str, Any]) -> ExperimentBook:
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps({"experiments": list(experiments)}), encoding="utf-8")
    return load_experiments(path)


def test_an_interleaving_experiment_assigns_every_covered_user_both_arms(
    tmp_path: Path,
) -> None:
    book = _book(tmp_path, _interleave(coverage=0.5))
    (experiment,) = book.experiments
    assert experiment.type == "interleave"
    assert [v.weight for v in experiment.variants] == [0.5, 0.5]
    found = [assign(book, tenant="demo", attributes={"user_id": f"u{i}"}) for i in range(4000)]
    covered = [a[0] for a in found if a]
    # Coverage 0.5: about half the users are in, and each of them sees both arms.
    assert 1800 < len(covered) < 2200
    for assignment in covered:
        assert assignment.variant_key == INTERLEAVED
        assert assignment.variant_index == -1
        assert dict(assignment.params) == {}
        assert [arm.key for arm in assignment.arms] == ["heavy", "light"]
        assert dict(assignment.arms[1].params) == {
            "ranking.heavy": "off",
            "ranking.mmr_lambda": "0.5",
        }
    # With the experiment service down, the gateway applies the control arm's knobs.
    assert dict(control_params(book, "demo")["rankers"]) == {"ranking.heavy": "on"}


def test_ab_experiments_keep_their_type_and_no_arms(tmp_path: Path) -> None:
    ab = {
        "key": "ab",
        "variants": [{"key": "c", "params": {"retrieval.k": "1"}}, {"key": "t"}],
    }
    book = _book(tmp_path, ab)
    assert book.experiments[0].type == "ab"
    assert all(not a.arms for a in assign(book, tenant="demo", attributes={"user_id": "u"}))


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"type": "bandit"}, "experiments[0].type", "'ab' or 'interleave'"),
        (
            {"variants": [{"key": "a"}, {"key": "b"}, {"key": "c"}]},
            "experiments[0].variants",
            "exactly 2 variants",
        ),
        (
            {"variants": [{"key": "a", "weight": 0.5}, {"key": "b", "weight": 0.5}]},
            "experiments[0].variants[0].weight",
            "no weights",
        ),
        (
            {"variants": [{"key": "a", "params": {"retrieval.k": "600"}}, {"key": "b"}]},
            "experiments[0].variants[0].params.retrieval.k",
            "not a knob an interleaving arm can set",
        ),
        (
            {"variants": [{"key": "a"}, {"key": "b", "params": {"ranking.heavy": "maybe"}}]},
            "experiments[0].variants[1].params.ranking.heavy",
            "on or off",
        ),
        (
            {"variants": [{"key": "a"}, {"key": "b", "params": {"ranking.heavy_keep": "0"}}]},
            "experiments[0].variants[1].params.ranking.heavy_keep",
            "count >= 1",
        ),
        (
            {"variants": [{"key": "a"}, {"key": "b", "params": {"ranking.mmr_lambda": "1.5"}}]},
            "experiments[0].variants[1].params.ranking.mmr_lambda",
            "[0, 1]",
        ),
        (
            {"variants": [{"key": "a"}, {"key": "b", "params": {"ranking.ctr_weight": "-1"}}]},
            "experiments[0].variants[1].params.ranking.ctr_weight",
            ">= 0",
        ),
        (
            {"variants": [{"key": "a"}, {"key": "b", "params": {"ranking.diversity": "x"}}]},
            "experiments[0].variants[1].params.ranking.diversity",
            "mmr, cap or none",
        ),
    ],
)
def test_a_bad_interleaving_experiment_is_refused_naming_the_field(
    tmp_path: Path, change: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="rankers") as raised:
        _book(tmp_path, _interleave(**change))
    assert raised.value.field == field
    assert message in str(raised.value)


def test_two_interleaving_experiments_must_not_overlap(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="overlaps interleaving experiment 'first'") as raised:
        _book(tmp_path, _interleave("first"), _interleave("second"))
    assert raised.value.field == "experiments[1].namespace"
    with pytest.raises(ConfigError, match="overlaps"):
        _book(
            tmp_path,
            _interleave("first", namespace=["rank", 0.0, 0.6]),
            _interleave("second", namespace=["rank", 0.5, 1.0]),
        )
    # Disjoint ranges of one namespace, other tenants, or an inactive one: accepted.
    _book(
        tmp_path,
        _interleave("first", namespace=["rank", 0.0, 0.5]),
        _interleave("second", namespace=["rank", 0.5, 1.0]),
    )
    _book(tmp_path, _interleave("first", tenants=["demo"]), _interleave("second", tenants=["acme"]))
    _book(tmp_path, _interleave("first"), _interleave("second", active=False))
