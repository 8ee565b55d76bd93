"""The run harness's pure parts: tenant registries and the pace of a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.harness import write_tenants
from loadtest.steps import Traffic, locust_command, pace, tenant_keys
from mesh.tenants import load_tenants


def test_the_run_tenant_registry_authenticates_its_keys(tmp_path: Path) -> None:
    path = write_tenants(tmp_path / "tenants.json", {"demo": "s1", "acme": "s2"}, rate=5, burst=9)
    registry = load_tenants(path)
    demo, acme = registry.authenticate("s1"), registry.authenticate("s2")
    assert demo is not None and demo.name == "demo" and (demo.rate, demo.burst) == (5.0, 9)
    assert acme is not None and acme.name == "acme"
    assert registry.authenticate("demo-key") is None


@pytest.mark.parametrize("rate", [1, 10, 25, 33, 250, 0.3])
def test_a_step_offers_exactly_its_rate_with_users_no_faster_than_the_default(rate: float) -> None:
    users, per_user = pace(rate)
    assert users * per_user == pytest.approx(rate)
    assert per_user <= 0.5 + 1e-12


def test_every_run_has_fresh_keys_for_three_weighted_tenants(tmp_path: Path) -> None:
    first, second = tenant_keys(), tenant_keys()
    assert [k.name for k in first] == ["demo", "acme", "globex"]
    assert not {k.api_key for k in first} & {k.api_key for k in second}
    traffic = Traffic(tmp_path, tmp_path / "keys.json", 0.2, 0.8, 0)
    command = locust_command("http://127.0.0.1:1", 50, 0.5, 40, traffic, tmp_path / "r.jsonl")
    assert command[command.index("--users") + 1] == "50"
    assert command[command.index("--run-time") + 1] == "40s"
    assert command[-2:] == ["--record", str(tmp_path / "r.jsonl")]
