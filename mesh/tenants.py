"""The tenant registry: who may call, with which API key, and at what rate.

Keys are stored as SHA-256 hex digests, never in clear. The file is JSON::

    {"tenants": {"demo": {"api_key_sha256": "<hex>", "rate": 300, "burst": 600}}}

``rate`` is requests per second and ``burst`` the bucket size of the tenant's quota.
An optional ``retention_days`` (a positive number) bounds how long the tenant's event log
keeps its entries (``recmesh events trim`` and the projector snapshot the projections
first, so a rebuild still works); without it the log is kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mesh.context import API_KEY, tenant_var, validate_tenant
from mesh.errors import ConfigError, InvalidArgument, Unauthenticated

_FIELDS = {"api_key_sha256", "rate", "burst"}
_OPTIONAL = {"retention_days"}


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key_sha256: str
    rate: float
    burst: int
    retention_days: float | None = None


@dataclass(frozen=True)
class TenantRegistry:
    tenants: Mapping[str, Tenant]

    def authenticate(self, api_key: str) -> Tenant | None:
        """The tenant whose key hashes to the digest of ``api_key``, compared in constant time."""
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        found = None
        for tenant in self.tenants.values():
            if hmac.compare_digest(digest, tenant.api_key_sha256):
                found = tenant
        return found

    def admit(self, api_key: str, carrier: str) -> Tenant:
        """Authenticate a request of either API: the tenant that owns ``api_key`` becomes
        the request's tenant (``tenant_var``: logs, metrics, spans, downstream metadata).

        Args:
            api_key: the ``x-api-key`` value sent, empty when none was.
            carrier: where the key travels, for the error ("header", "metadata").

        Raises:
            Unauthenticated: no key, or one that belongs to no tenant (401 / UNAUTHENTICATED).
        """
        tenant = self.authenticate(api_key) if api_key else None
        if tenant is None:
            raise Unauthenticated(f"missing or unknown {API_KEY} {carrier}")
        tenant_var.set(tenant.name)
        return tenant

    def get(self, name: str) -> Tenant | None:
        return self.tenants.get(name)


def load_tenants(path: Path) -> TenantRegistry:
    """Read and validate a tenant file.

    Raises:
        ConfigError: unreadable file, unknown or missing fields, bad values; the message
            names the tenant and the field.
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"tenant file {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("tenants"), dict):
        raise ConfigError(f"tenant file {path}: expected an object with a 'tenants' object")
    tenants: dict[str, Tenant] = {}
    for name, spec in raw["tenants"].items():
        try:
            validate_tenant(name)
        except InvalidArgument as exc:
            raise ConfigError(f"tenant file {path}: tenant name {name!r} is invalid") from exc
        if not isinstance(spec, dict) or not _FIELDS <= set(spec) <= _FIELDS | _OPTIONAL:
            raise ConfigError(
                f"tenant file {path}: tenant {name!r} must have exactly {_FIELDS}"
                f" and may have {_OPTIONAL}"
            )
        digest = spec["api_key_sha256"]
        if not isinstance(digest, str) or len(digest) != 64:
            raise ConfigError(f"tenant {name!r}: api_key_sha256 must be 64 hex characters")
        rate, burst = spec["rate"], spec["burst"]
        if not isinstance(rate, int | float) or rate <= 0:
            raise ConfigError(f"tenant {name!r}: rate must be a positive number")
        if not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"tenant {name!r}: burst must be a positive integer")
        retention = spec.get("retention_days")
        if retention is not None and (
            isinstance(retention, bool) or not isinstance(retention, int | float) or retention <= 0
        ):
            raise ConfigError(f"tenant {name!r}: retention_days must be a positive number")
        tenants[name] = Tenant(
            name,
            digest.lower(),
            float(rate),
            burst,
            float(retention) if retention is not None else None,
        )
    if not tenants:
        raise ConfigError(f"tenant file {path}: no tenants")
    return TenantRegistry(tenants)
