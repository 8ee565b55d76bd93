"""GrowthBook SDK conformance: every hashing and bucketing case of the shared suite must pass.

The cases live in ``conformance/growthbook/cases.json`` beside this file (copied from the
GrowthBook SDK suite, MIT, see LICENSE there). Expected floats are rounded in the source, so
floats are compared with an absolute tolerance of 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.experiments.growthbook import (
    choose_variation,
    fnv1a32,
    gb_hash,
    get_bucket_ranges,
    get_equal_weights,
    in_namespace,
)

CASES_PATH = Path(__file__).parent / "conformance" / "growthbook" / "cases.json"
CASES: dict[str, Any] = json.loads(CASES_PATH.read_text(encoding="utf-8"))
TOLERANCE = 1e-3


def _names(section: str) -> list[str]:
    """Test ids for a section whose cases start with their own name."""
    return [case[0] for case in CASES[section]]


def test_suite_is_the_expected_spec_version() -> None:
    assert CASES["specVersion"] == "0.7.1"
    for section in ("hash", "getBucketRange", "chooseVariation", "inNamespace", "getEqualWeights"):
        assert CASES[section], f"section {section} is empty"


@pytest.mark.parametrize(
    "case", CASES["hash"], ids=[f"v{c[2]}:{c[0]!r}+{c[1]!r}" for c in CASES["hash"]]
)
def test_hash(case: list[Any]) -> None:
    seed, value, version, expected = case
    result = gb_hash(seed, value, version)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("case", CASES["getBucketRange"], ids=_names("getBucketRange"))
def test_get_bucket_ranges(case: list[Any]) -> None:
    _, (num_variations, coverage, weights), expected = case
    result = get_bucket_ranges(num_variations, coverage, weights)
    assert len(result) == len(expected)
    for (start, end), (expected_start, expected_end) in zip(result, expected, strict=True):
        assert start == pytest.approx(expected_start, abs=TOLERANCE)
        assert end == pytest.approx(expected_end, abs=TOLERANCE)


@pytest.mark.parametrize("case", CASES["chooseVariation"], ids=_names("chooseVariation"))
def test_choose_variation(case: list[Any]) -> None:
    _, n, ranges, expected = case
    assert choose_variation(n, [tuple(r) for r in ranges]) == expected


@pytest.mark.parametrize("case", CASES["inNamespace"], ids=_names("inNamespace"))
def test_in_namespace(case: list[Any]) -> None:
    _, user_id, (namespace_id, start, end), expected = case
    assert in_namespace(user_id, (namespace_id, start, end)) is expected


@pytest.mark.parametrize(
    "case",
    CASES["getEqualWeights"],
    ids=[f"getEqualWeights[{case[0]}]" for case in CASES["getEqualWeights"]],
)
def test_get_equal_weights(case: list[Any]) -> None:
    num_variations, expected = case
    result = get_equal_weights(num_variations)
    assert len(result) == len(expected)
    for weight, expected_weight in zip(result, expected, strict=True):
        assert weight == pytest.approx(expected_weight, abs=TOLERANCE)


def test_fnv1a32_known_vectors() -> None:
    # Published FNV-1a 32-bit test vectors (ASCII, where code points equal bytes).
    assert fnv1a32("") == 0x811C9DC5
    assert fnv1a32("a") == 0xE40C292C
    assert fnv1a32("foobar") == 0xBF9CF968


def test_hash_is_in_unit_interval_and_exact_for_unrounded_version_1() -> None:
    # Version 1 has three decimals of resolution, so the suite's values are exact.
    assert gb_hash("", "a", 1) == 0.22
    for value in ("", "x", "user-123", "é✓"):
        for version in (1, 2):
            result = gb_hash("seed", value, version)
            assert result is not None
            assert 0.0 <= result < 1.0
