"""The guardrails of an experiment in the book: optional, each bound optional, strictly
validated like every other field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.experiments.book import Guardrails, load_experiments
from mesh.errors import ConfigError


def _load(tmp_path: Path, guardrails: Any) -> Guardrails:
    experiment: dict[str, Any] = {"key": "exp", "variants": [{"key": "a"}, {"key": "b"}]}
    if guardrails is not None:
        experiment["guardrails"] = guardrails
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps({"experiments": [experiment]}), encoding="utf-8")
    return load_experiments(path).experiments[0].guardrails


def test_guardrails_are_optional_and_each_bound_too(tmp_path: Path) -> None:
    assert _load(tmp_path, None) == Guardrails() and Guardrails().bounds() == []
    full = _load(tmp_path, {"degraded_share": 0.05, "p99_latency_ms": 120, "error_rate": 0.01})
    assert full.bounds() == [
        ("degraded_share", 0.05),
        ("p99_latency_ms", 120.0),
        ("error_rate", 0.01),
    ]
    assert _load(tmp_path, {"error_rate": 0}).bounds() == [("error_rate", 0.0)]


@pytest.mark.parametrize(
    ("guardrails", "field"),
    [
        ([0.05], "guardrails"),
        ({"p95_latency_ms": 100}, "guardrails.p95_latency_ms"),
        ({"degraded_share": 1.5}, "guardrails.degraded_share"),
        ({"degraded_share": True}, "guardrails.degraded_share"),
        ({"error_rate": "1%"}, "guardrails.error_rate"),
        ({"p99_latency_ms": 0}, "guardrails.p99_latency_ms"),
        ({"p99_latency_ms": -5}, "guardrails.p99_latency_ms"),
        ({"p99_latency_ms": False}, "guardrails.p99_latency_ms"),
    ],
)
def test_invalid_guardrails_are_rejected_with_their_path(
    tmp_path: Path, guardrails: Any, field: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, guardrails)
    assert raised.value.field == f"experiments[0].{field}"
    assert "'exp'" in raised.value.message
