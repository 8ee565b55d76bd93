"""API-key authentication, the same for the HTTP and the gRPC API."""

from __future__ import annotations

import contextvars
import hashlib
import json
from pathlib import Path

import pytest

from mesh.context import tenant_var
from mesh.errors import ConfigError, Unauthenticated
from mesh.tenants import Tenant, TenantRegistry, load_tenants

REGISTRY = TenantRegistry(
    {
        name: Tenant(name, hashlib.sha256(key.encode()).hexdigest(), 10.0, 20)
        for name, key in (("demo", "demo-key"), ("acme", "acme-key"))
    }
)


def test_a_known_key_admits_its_tenant_and_makes_it_the_requests_tenant() -> None:
    def admit() -> tuple[str, str]:
        return REGISTRY.admit("acme-key", "header").name, tenant_var.get()

    assert contextvars.copy_context().run(admit) == ("acme", "acme")


@pytest.mark.parametrize(("key", "carrier"), [("", "header"), ("nope", "metadata")])
def test_a_missing_or_unknown_key_is_refused_naming_where_it_was_looked_for(
    key: str, carrier: str
) -> None:
    def admit() -> str:
        tenant_var.set("")
        with pytest.raises(Unauthenticated, match=f"x-api-key {carrier}") as refused:
            REGISTRY.admit(key, carrier)
        assert refused.value.http_status == 401
        return tenant_var.get()

    assert contextvars.copy_context().run(admit) == ""  # no tenant was set


def tenant_file(tmp_path: Path, **extra: object) -> Path:
    spec = {"api_key_sha256": "a" * 64, "rate": 10, "burst": 20, **extra}
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": {"demo": spec}}))
    return path


def test_retention_is_optional_and_read_in_days(tmp_path: Path) -> None:
    assert load_tenants(tenant_file(tmp_path)).tenants["demo"].retention_days is None
    kept = load_tenants(tenant_file(tmp_path, retention_days=30)).tenants["demo"]
    assert kept.retention_days == 30.0


@pytest.mark.parametrize("bad", [0, -1, "30", True])
def test_a_retention_that_is_not_a_positive_number_is_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="retention_days"):
        load_tenants(tenant_file(tmp_path, retention_days=bad))


def test_an_unknown_tenant_field_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="may have"):
        load_tenants(tenant_file(tmp_path, retention=30))
