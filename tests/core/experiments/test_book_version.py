"""The book's version: stable across formatting, new with any change, sent with every answer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.book import load_experiments
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

BOOK: dict[str, Any] = {
    "experiments": [
        {
            "key": "retrieval-k",
            "hash_version": 2,
            "variants": [
                {"key": "control", "weight": 0.5, "params": {"retrieval.k": "300"}},
                {"key": "wide", "weight": 0.5, "params": {"retrieval.k": "600"}},
            ],
        },
        {
            "key": "heavy",
            "variants": [
                {"key": "control", "params": {"ranking.heavy": "on"}},
                {"key": "off", "params": {"ranking.heavy": "off"}},
            ],
        },
    ]
}


def _version(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return load_experiments(path).version


def _reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _reversed_keys(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(item) for item in value]
    return value


def test_version_is_16_hex_digits_and_ignores_formatting_and_key_order(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    compact = _version(path, json.dumps(BOOK))
    assert re.fullmatch(r"[0-9a-f]{16}", compact)
    assert _version(path, json.dumps(BOOK, indent=4)) == compact
    assert _version(path, json.dumps(_reversed_keys(BOOK))) == compact


def test_version_changes_with_the_content(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    original = _version(path, json.dumps(BOOK))
    weights = json.loads(json.dumps(BOOK))
    weights["experiments"][0]["variants"][0]["weight"] = 0.4
    weights["experiments"][0]["variants"][1]["weight"] = 0.6
    params = json.loads(json.dumps(BOOK))
    params["experiments"][1]["variants"][1]["params"]["ranking.heavy"] = "on"
    reordered = {"experiments": list(reversed(BOOK["experiments"]))}
    versions = {
        original,
        _version(path, json.dumps(weights)),
        _version(path, json.dumps(params)),
        _version(path, json.dumps(reordered)),
    }
    assert len(versions) == 4


async def _served_version(path: Path) -> str:
    server = await built_server(build_service, ExperimentSettings(port=0, experiments=path))
    async with serving(server), channel_to(server) as channel:
        reply = await experiment_pb2_grpc.ExperimentServiceStub(channel).Assign(
            experiment_pb2.AssignRequest(user_id="u1"), metadata=tenant_metadata("demo")
        )
    assert reply.assignments
    return reply.book_version


async def test_the_service_answers_with_the_version_of_the_book_it_loaded(tmp_path: Path) -> None:
    first = tmp_path / "first.json"
    first.write_text(json.dumps(BOOK), encoding="utf-8")
    changed = json.loads(json.dumps(BOOK))
    changed["experiments"][0]["variants"][1]["params"]["retrieval.k"] = "800"
    second = tmp_path / "second.json"
    second.write_text(json.dumps(changed), encoding="utf-8")

    served = await _served_version(first)
    assert served == load_experiments(first).version
    assert await _served_version(second) == load_experiments(second).version != served
