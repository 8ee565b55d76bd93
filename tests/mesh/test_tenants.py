"""API-key authentication, the same for the HTTP and the gRPC API."""

from __future__ import annotations

import contextvars
import hashlib

import pytest

from mesh.context import tenant_var
from mesh.errors import Unauthenticated
from mesh.tenants import Tenant, TenantRegistry

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
