"""Assignment engine: config validation, determinism, traffic splits, targeting, exclusivity."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from core.experiments.assign import Assignment, assign, control_params
from core.experiments.book import ExperimentBook, load_experiments
from mesh.errors import ConfigError, InvalidArgument

REPO_ROOT = Path(__file__).resolve().parents[3]
DEV_CONFIG = REPO_ROOT / "config" / "experiments.json"
USERS = [f"user-{i}" for i in range(20_000)]


def _experiment(key: str = "exp", **overrides: Any) -> dict[str, Any]:
    experiment: dict[str, Any] = {
        "key": key,
        "hash_version": 2,
        "variants": [
            {"key": "control", "weight": 0.5, "params": {"retrieval.k": "300"}},
            {"key": "treatment", "weight": 0.5, "params": {"retrieval.k": "600"}},
        ],
    }
    experiment.update(overrides)
    return experiment


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _book(tmp_path: Path, *experiments: dict[str, Any]) -> ExperimentBook:
    return load_experiments(_write(tmp_path, {"experiments": list(experiments)}))


def _assign_user(book: ExperimentBook, user_id: str, tenant: str = "demo") -> list[Assignment]:
    return assign(book, tenant=tenant, attributes={"user_id": user_id})


# --- the shipped development config -----------------------------------------------------------


def test_dev_config_loads_and_every_experiment_changes_a_real_knob() -> None:
    book = load_experiments(DEV_CONFIG)
    assert book.experiments
    for experiment in book.experiments:
        control = experiment.variants[0].params
        assert any(variant.params != control for variant in experiment.variants[1:]), (
            f"{experiment.key}: every variant has the control's params"
        )
    knobs = {name for e in book.experiments for v in e.variants for name in v.params}
    assert {"retrieval.k", "ranking.heavy"} <= knobs


def test_dev_config_assigns_demo_users() -> None:
    book = load_experiments(DEV_CONFIG)
    included = Counter(a.experiment_key for u in USERS[:2000] for a in _assign_user(book, u))
    assert included["retrieval-k"] == 2000
    # The heavy-ranker holdout owns 10% of the ranking layer: a small share.
    assert 100 < included["heavy-ranker-holdout"] < 300


# --- determinism and GrowthBook parity --------------------------------------------------------


def test_same_inputs_always_give_the_same_assignments(tmp_path: Path) -> None:
    first = _book(tmp_path, _experiment("a"), _experiment("b", coverage=0.5))
    second = load_experiments(tmp_path / "experiments.json")
    for user_id in USERS[:500]:
        once = _assign_user(first, user_id)
        assert once == _assign_user(first, user_id)
        assert once == _assign_user(second, user_id)


def test_matches_growthbook_hash_for_a_suite_vector(tmp_path: Path) -> None:
    # cases.json: hash("90850943850283058242805", "123", 2) == 0.7516 -> second half of 50/50.
    book = _book(tmp_path, _experiment("exp", seed="90850943850283058242805"))
    [assignment] = _assign_user(book, "123")
    assert assignment.hash_value == pytest.approx(0.7516)
    assert assignment.variant_index == 1
    assert assignment.variant_key == "treatment"
    assert dict(assignment.params) == {"retrieval.k": "600"}
    assert assignment.in_experiment is True


def test_seed_defaults_to_key_and_hash_version_to_1(tmp_path: Path) -> None:
    raw = _experiment("90850943850283058242805")
    del raw["hash_version"]
    [experiment] = _book(tmp_path, raw).experiments
    assert experiment.seed == "90850943850283058242805"
    assert experiment.hash_version == 1


# --- traffic splits ---------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.8], [0.2, 0.3, 0.5]])
def test_weight_split_is_honoured_within_two_percent(tmp_path: Path, weights: list[float]) -> None:
    variants = [
        {"key": f"v{i}", "weight": w, "params": {"retrieval.k": str(100 * (i + 1))}}
        for i, w in enumerate(weights)
    ]
    book = _book(tmp_path, _experiment("split", variants=variants))
    counts = Counter(a.variant_index for u in USERS for a in _assign_user(book, u))
    assert sum(counts.values()) == len(USERS)
    for index, weight in enumerate(weights):
        assert abs(counts[index] / len(USERS) - weight) <= 0.02, (index, counts)


def test_weights_default_to_an_even_split(tmp_path: Path) -> None:
    variants = [{"key": k} for k in ("a", "b", "c", "d")]
    book = _book(tmp_path, _experiment("even", variants=variants))
    assert [v.weight for v in book.experiments[0].variants] == [0.25] * 4
    counts = Counter(a.variant_key for u in USERS for a in _assign_user(book, u))
    for key in ("a", "b", "c", "d"):
        assert abs(counts[key] / len(USERS) - 0.25) <= 0.02


def test_half_coverage_includes_about_half_and_keeps_the_split(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment("half", coverage=0.5))
    results = [_assign_user(book, u) for u in USERS]
    included = [r[0] for r in results if r]
    assert abs(len(included) / len(USERS) - 0.5) <= 0.02
    treated = sum(a.variant_index for a in included)
    assert abs(treated / len(included) - 0.5) <= 0.02


def test_lowering_coverage_never_moves_a_user_between_variants(tmp_path: Path) -> None:
    full = _book(tmp_path, _experiment("c", coverage=1.0))
    partial = _book(tmp_path, _experiment("c", coverage=0.3))
    for user_id in USERS[:3000]:
        narrow = _assign_user(partial, user_id)
        if narrow:
            assert narrow[0].variant_index == _assign_user(full, user_id)[0].variant_index


def test_zero_coverage_includes_no_one(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment("off", coverage=0))
    assert not any(_assign_user(book, u) for u in USERS[:2000])


# --- eligibility ------------------------------------------------------------------------------


def test_tenant_targeting(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment("acme-only", tenants=["acme"]), _experiment("all"))
    assert [a.experiment_key for a in _assign_user(book, "u1", tenant="acme")] == [
        "acme-only",
        "all",
    ]
    assert [a.experiment_key for a in _assign_user(book, "u1", tenant="demo")] == ["all"]


def test_inactive_experiment_assigns_no_one(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment("paused", active=False))
    assert not any(_assign_user(book, u) for u in USERS[:500])


def test_missing_or_empty_hash_attribute_skips_the_experiment(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment("by-session", hash_attribute="session_id"))
    assert assign(book, tenant="demo", attributes={"user_id": "u1"}) == []
    assert assign(book, tenant="demo", attributes={"session_id": ""}) == []
    [assignment] = assign(book, tenant="demo", attributes={"session_id": "s-1"})
    assert assignment.experiment_key == "by-session"


def test_namespace_exclusivity(tmp_path: Path) -> None:
    book = _book(
        tmp_path,
        _experiment("left", namespace=["ranking-layer", 0.0, 0.5]),
        _experiment("right", namespace=["ranking-layer", 0.5, 1.0]),
    )
    seen: Counter[str] = Counter()
    for user_id in USERS:
        keys = [a.experiment_key for a in _assign_user(book, user_id)]
        assert len(keys) <= 1, f"{user_id} is in both {keys}"
        seen.update(keys)
    # Every user is in exactly one slice, and each slice holds about half of them.
    assert seen["left"] + seen["right"] == len(USERS)
    assert abs(seen["left"] / len(USERS) - 0.5) <= 0.02


def test_results_follow_book_order(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment("z"), _experiment("a"), _experiment("m"))
    assert [a.experiment_key for a in _assign_user(book, "u1")] == ["z", "a", "m"]


@pytest.mark.parametrize("tenant", ["", None])
def test_empty_tenant_is_invalid_argument(tmp_path: Path, tenant: Any) -> None:
    book = _book(tmp_path, _experiment())
    with pytest.raises(InvalidArgument) as caught:
        assign(book, tenant=tenant, attributes={"user_id": "u1"})
    assert caught.value.field == "tenant"


def test_non_string_hash_attribute_is_invalid_argument(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment())
    attributes: Any = {"user_id": 42}
    with pytest.raises(InvalidArgument) as caught:
        assign(book, tenant="demo", attributes=attributes)
    assert caught.value.field == "attributes.user_id"


# --- fallback ---------------------------------------------------------------------------------


def test_control_params_are_the_first_variant_of_each_targeted_active_experiment(
    tmp_path: Path,
) -> None:
    book = _book(
        tmp_path,
        _experiment("everyone"),
        _experiment("acme-only", tenants=["acme"]),
        _experiment("paused", active=False),
    )
    assert control_params(book, "demo") == {"everyone": {"retrieval.k": "300"}}
    assert control_params(book, "acme") == {
        "everyone": {"retrieval.k": "300"},
        "acme-only": {"retrieval.k": "300"},
    }


def test_params_are_read_only(tmp_path: Path) -> None:
    book = _book(tmp_path, _experiment())
    [assignment] = _assign_user(book, "u1")
    params: Any = assignment.params
    with pytest.raises(TypeError):
        params["retrieval.k"] = "1"


# --- config errors ----------------------------------------------------------------------------


def _config_error(tmp_path: Path, document: object) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_experiments(_write(tmp_path, document))
    return caught.value


def test_unknown_experiment_key_is_rejected_naming_experiment_and_key(tmp_path: Path) -> None:
    error = _config_error(tmp_path, {"experiments": [_experiment("ranker-v2", colour="blue")]})
    assert "'ranker-v2'" in error.message
    assert "'colour'" in error.message
    assert error.field == "experiments[0].colour"


def test_unknown_variant_key_is_rejected(tmp_path: Path) -> None:
    variants = [{"key": "a", "weight": 0.5}, {"key": "b", "weight": 0.5, "value": 1}]
    error = _config_error(tmp_path, {"experiments": [_experiment("x", variants=variants)]})
    assert "'x'" in error.message
    assert "'variants[1].value'" in error.message
    assert error.field == "experiments[0].variants[1].value"


@pytest.mark.parametrize("weights", [[0.5, 0.4], [0.7, 0.6], [0.5, 0.5, 0.5]])
def test_weights_not_summing_to_one_are_rejected(tmp_path: Path, weights: list[float]) -> None:
    variants = [{"key": f"v{i}", "weight": w} for i, w in enumerate(weights)]
    error = _config_error(tmp_path, {"experiments": [_experiment("w", variants=variants)]})
    assert "'w'" in error.message
    assert "sum" in error.message
    assert error.field == "experiments[0].variants"


def test_duplicate_experiment_key_is_rejected(tmp_path: Path) -> None:
    error = _config_error(tmp_path, {"experiments": [_experiment("dup"), _experiment("dup")]})
    assert "'dup'" in error.message
    assert "duplicate" in error.message
    assert error.field == "experiments[1].key"


@pytest.mark.parametrize("variants", [[], [{"key": "only", "weight": 1.0}], None])
def test_empty_or_single_variant_list_is_rejected(tmp_path: Path, variants: Any) -> None:
    raw = _experiment("lonely", variants=variants)
    if variants is None:
        del raw["variants"]
    error = _config_error(tmp_path, {"experiments": [raw]})
    assert "'lonely'" in error.message
    assert error.field == "experiments[0].variants"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hash_version": 3}, "hash_version"),
        ({"hash_version": True}, "hash_version"),
        ({"coverage": 1.5}, "coverage"),
        ({"coverage": -0.1}, "coverage"),
        ({"coverage": "half"}, "coverage"),
        ({"seed": ""}, "seed"),
        ({"hash_attribute": 7}, "hash_attribute"),
        ({"active": "yes"}, "active"),
        ({"tenants": []}, "tenants"),
        ({"tenants": ["demo", ""]}, "tenants"),
        ({"namespace": ["layer", 0.5, 0.5]}, "namespace"),
        ({"namespace": ["layer", 0.0]}, "namespace"),
        ({"namespace": ["", 0.0, 1.0]}, "namespace"),
        ({"namespace": ["layer", 0.0, 1.5]}, "namespace"),
        (
            {"variants": [{"key": "a", "weight": 0.5}, {"key": "a", "weight": 0.5}]},
            "variants[1].key",
        ),
        ({"variants": [{"key": "a", "weight": 1.0}, {"key": "b"}]}, "variants"),
        (
            {"variants": [{"key": "a", "weight": 1.5}, {"key": "b", "weight": -0.5}]},
            "variants[0].weight",
        ),
        ({"variants": [{"key": "a", "params": {"k": 300}}, {"key": "b"}]}, "variants[0].params"),
        ({"variants": [{"key": ""}, {"key": "b"}]}, "variants[0].key"),
        ({"variants": ["a", "b"]}, "variants[0]"),
    ],
)
def test_invalid_fields_are_rejected_with_their_path(
    tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    error = _config_error(tmp_path, {"experiments": [_experiment("bad", **overrides)]})
    assert "'bad'" in error.message
    assert error.field == f"experiments[0].{field}"


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"experiments": {}},
        {"experiments": [], "version": 2},
        {"experiments": ["not-an-object"]},
        {"experiments": [{"variants": []}]},
    ],
)
def test_malformed_documents_are_rejected(tmp_path: Path, document: object) -> None:
    _config_error(tmp_path, document)


def test_invalid_json_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"experiments": [', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_experiments(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_experiments(tmp_path / "missing.json")


def test_repeated_json_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    path.write_text('{"experiments": [], "experiments": []}', encoding="utf-8")
    with pytest.raises(ConfigError, match="'experiments' appears twice"):
        load_experiments(path)
