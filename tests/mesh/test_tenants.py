"""API-key authentication, the same for the HTTP and the gRPC API: keys with ids, scopes,
expiry and revocation; the older single-digest form; the live registry of a watched file."""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY as METRICS

from mesh.context import tenant_var
from mesh.errors import ConfigError, PermissionDenied, Unauthenticated
from mesh.tenants import (
    ADMIN,
    EVENTS,
    LEGACY_KEY_ID,
    RECOMMEND,
    SCOPES,
    ApiKey,
    LiveRegistry,
    Tenant,
    TenantRegistry,
    digest_of,
    load_tenants,
)

NOW = 1_800_000_000.0


def key(key_id: str, secret: str, *scopes: str, **extra: Any) -> ApiKey:
    return ApiKey(key_id, digest_of(secret), frozenset(scopes or SCOPES), **extra)


REGISTRY = TenantRegistry(
    {
        "demo": Tenant(
            "demo",
            10.0,
            20,
            keys=(
                key("old", "demo-key"),
                key("new", "demo-key-2", RECOMMEND, EVENTS),
                key("gone", "demo-revoked", revoked=True),
                key("late", "demo-expired", not_after=NOW),
            ),
        ),
        "acme": Tenant("acme", 10.0, 20, keys=(key("k", "acme-key"),)),
    },
    clock=lambda: NOW,
)


def failures(reason: str, tenant: str) -> float:
    labels = {"reason": reason, "tenant": tenant}
    return METRICS.get_sample_value("recmesh_auth_failures_total", labels) or 0.0


def in_request(call: Any) -> Any:
    """Run ``call`` in a fresh context whose tenant was set by something before (the leak
    a refused request must not inherit)."""

    def run() -> Any:
        tenant_var.set("someone-else")
        return call(), tenant_var.get()

    return contextvars.copy_context().run(run)


def test_a_known_key_admits_its_tenant_and_makes_it_the_requests_tenant() -> None:
    caller, tenant = in_request(lambda: REGISTRY.admit("acme-key", "header", RECOMMEND))
    assert (caller.tenant.name, caller.key.key_id, tenant) == ("acme", "k", "acme")


def test_two_keys_of_a_tenant_are_valid_at_once_during_a_rotation() -> None:
    old = REGISTRY.admit("demo-key", "header", RECOMMEND)
    new = REGISTRY.admit("demo-key-2", "metadata", RECOMMEND)
    assert (old.tenant.name, old.key.key_id) == ("demo", "old")
    assert (new.tenant.name, new.key.key_id) == ("demo", "new")


@pytest.mark.parametrize(
    ("secret", "carrier", "reason", "tenant", "message"),
    [
        ("", "header", "missing", "-", "missing or unknown x-api-key header"),
        ("nope", "metadata", "unknown", "-", "missing or unknown x-api-key metadata"),
        ("demo-revoked", "header", "revoked", "demo", "x-api-key header names a revoked key"),
        ("demo-expired", "header", "expired", "demo", "x-api-key header names an expired key"),
    ],
)
def test_a_refused_key_is_401_counted_by_reason_and_leaves_no_tenant(
    secret: str, carrier: str, reason: str, tenant: str, message: str
) -> None:
    before = failures(reason, tenant)

    def admit() -> None:
        with pytest.raises(Unauthenticated, match=message) as refused:
            REGISTRY.admit(secret, carrier, RECOMMEND)
        assert refused.value.http_status == 401
        assert secret not in refused.value.message or not secret  # never the key

    assert in_request(admit)[1] == ""
    assert failures(reason, tenant) == before + 1


def test_a_key_expires_at_its_not_after_time() -> None:
    clock = [NOW - 1.0]
    registry = TenantRegistry(REGISTRY.tenants, clock=lambda: clock[0])
    assert registry.admit("demo-expired", "header", RECOMMEND).key.key_id == "late"
    clock[0] = NOW
    with pytest.raises(Unauthenticated, match="expired"):
        registry.admit("demo-expired", "header", RECOMMEND)
    assert registry.authenticate("demo-expired") is None


def test_a_key_without_the_scope_is_403_naming_it_and_counted_under_its_tenant() -> None:
    before = failures("scope", "demo")

    def admit() -> None:
        with pytest.raises(PermissionDenied, match="lacks the 'admin' scope") as refused:
            REGISTRY.admit("demo-key-2", "header", ADMIN)
        assert (refused.value.http_status, refused.value.grpc_code.name) == (
            403,
            "PERMISSION_DENIED",
        )

    assert in_request(admit)[1] == "demo"  # authenticated: the refusal is the tenant's
    assert failures("scope", "demo") == before + 1


def test_an_unknown_scope_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        REGISTRY.admit("demo-key", "header", "everything")


def write(path: Path, tenants: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def tenant_file(tmp_path: Path, **extra: object) -> Path:
    spec = {"api_key_sha256": "a" * 64, "rate": 10, "burst": 20, **extra}
    return write(tmp_path / "tenants.json", {"demo": spec})


def test_the_single_digest_form_is_one_legacy_key_with_every_scope(tmp_path: Path) -> None:
    path = write(
        tmp_path / "tenants.json",
        {"demo": {"api_key_sha256": digest_of("demo-key").upper(), "rate": 10, "burst": 20}},
    )
    registry = load_tenants(path)
    (only,) = registry.tenants["demo"].keys
    assert (only.key_id, only.scopes, only.revoked, only.not_after) == (
        LEGACY_KEY_ID,
        frozenset(SCOPES),
        False,
        None,
    )
    for scope in SCOPES:
        assert registry.admit("demo-key", "header", scope).tenant.name == "demo"


def test_the_dev_tenant_file_and_its_keys_load() -> None:
    registry = load_tenants(Path(__file__).resolve().parents[2] / "config" / "tenants.dev.json")
    for secret, name in (("demo-key", "demo"), ("acme-key", "acme")):
        assert registry.admit(secret, "header", ADMIN).tenant.name == name


def test_keys_with_ids_scopes_and_times_load(tmp_path: Path) -> None:
    path = write(
        tmp_path / "tenants.json",
        {
            "demo": {
                "rate": 10,
                "burst": 20,
                "retention_days": 30,
                "keys": [
                    {"id": "a", "sha256": digest_of("one"), "scopes": ["events"]},
                    {
                        "id": "b",
                        "sha256": digest_of("two"),
                        "scopes": [],
                        "label": "nothing allowed",
                        "created": "2026-12-05T01:00:00Z",
                        "not_after": "2027-01-01T00:00:00",  # no offset: UTC
                        "revoked": True,
                    },
                ],
            }
        },
    )
    a, b = load_tenants(path).tenants["demo"].keys
    assert a == ApiKey("a", digest_of("one"), frozenset({"events"}))
    assert (b.scopes, b.label, b.revoked) == (frozenset(), "nothing allowed", True)
    assert (b.created, b.not_after) == (1796432400.0, 1798761600.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"keys": [], "api_key_sha256": "a" * 64}, "one of keys or api_key_sha256"),
        ({}, "one of keys or api_key_sha256"),
        ({"keys": {}}, "keys must be a list"),
        ({"keys": [{"id": "a", "sha256": "a" * 64}]}, "must have exactly"),
        ({"keys": [{"id": "a", "sha256": "a" * 64, "scopes": ["all"]}]}, "unknown scopes"),
        ({"keys": [{"id": "a b", "sha256": "a" * 64, "scopes": []}]}, "key id"),
        ({"keys": [{"id": "a", "sha256": "xyz", "scopes": []}]}, "64 hex"),
        ({"keys": [{"id": "a", "sha256": "g" * 64, "scopes": []}]}, "64 hex"),
        (
            {"keys": [{"id": "a", "sha256": "a" * 64, "scopes": [], "not_after": "soon"}]},
            "not_after must be an ISO 8601 time",
        ),
        (
            {"keys": [{"id": "a", "sha256": "a" * 64, "scopes": [], "revoked": "yes"}]},
            "revoked must be true or false",
        ),
        (
            {
                "keys": [
                    {"id": "a", "sha256": "a" * 64, "scopes": []},
                    {"id": "a", "sha256": "b" * 64, "scopes": []},
                ]
            },
            "appear more than once",
        ),
        (
            {
                "keys": [
                    {"id": "a", "sha256": "a" * 64, "scopes": []},
                    {"id": "b", "sha256": "a" * 64, "scopes": []},
                ]
            },
            "a key is one key",
        ),
    ],
)
def test_a_bad_key_list_is_refused_naming_what(
    tmp_path: Path, spec: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "tenants.json", {"demo": {"rate": 10, "burst": 20, **spec}})
    with pytest.raises(ConfigError, match=message):
        load_tenants(path)


def test_one_digest_for_keys_of_two_tenants_is_refused(tmp_path: Path) -> None:
    spec = {"api_key_sha256": "a" * 64, "rate": 10, "burst": 20}
    with pytest.raises(ConfigError, match="a key is one key"):
        load_tenants(write(tmp_path / "tenants.json", {"demo": spec, "acme": spec}))


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


def live_file(tmp_path: Path, rate: float = 10, **keys: dict[str, Any]) -> Path:
    return write(
        tmp_path / "tenants.json",
        {"demo": {"rate": rate, "burst": 20, "keys": [{"id": i, **k} for i, k in keys.items()]}},
    )


def reloads(outcome: str) -> float:
    labels = {"outcome": outcome}
    return METRICS.get_sample_value("recmesh_tenants_reloads_total", labels) or 0.0


def refused_now() -> float | None:
    return METRICS.get_sample_value("recmesh_tenants_file_refused")


def test_a_changed_file_replaces_the_registry_revocation_and_rate_at_once(
    tmp_path: Path,
) -> None:
    a = {"sha256": digest_of("key-a"), "scopes": ["recommend"]}
    b = {"sha256": digest_of("key-b"), "scopes": ["recommend"]}
    path = live_file(tmp_path, a=a)
    live = LiveRegistry(path, poll_s=0)
    before = reloads("loaded")
    assert not live.check()  # nothing changed
    live_file(tmp_path, rate=50, a=a, b=b)  # a second key: the rotation starts
    assert live.check()
    assert live.admit("key-b", "header", RECOMMEND).key.key_id == "b"
    live_file(tmp_path, rate=50, a={**a, "revoked": True}, b=b)
    assert live.check()
    with pytest.raises(Unauthenticated, match="revoked"):
        live.admit("key-a", "header", RECOMMEND)
    demo = live.get("demo")
    assert demo is not None and demo.rate == 50.0
    assert reloads("loaded") == before + 2


def test_a_broken_file_keeps_the_registry_until_it_is_fixed(tmp_path: Path) -> None:
    a = {"sha256": digest_of("key-a"), "scopes": ["recommend"]}
    path = live_file(tmp_path, a=a)
    live = LiveRegistry(path, poll_s=0)
    served = live.registry
    refused = reloads("refused")
    for broken in ('{"tenants": {"demo": {"rate": 10, "bu', '{"tenants": {}}', "\xff"):
        path.write_bytes(broken.encode("latin-1"))
        assert not live.check()
        assert not live.check()  # the same content: refused once, logged once
        assert live.registry is served
        assert live.admit("key-a", "header", RECOMMEND).tenant.name == "demo"
        assert refused_now() == 1
    assert reloads("refused") == refused + 3
    path.unlink()
    assert not live.check()
    assert live.registry is served
    live_file(tmp_path, a=a, b={"sha256": digest_of("key-b"), "scopes": []})
    assert live.check()
    assert refused_now() == 0
    assert [k.key_id for k in live.tenants["demo"].keys] == ["a", "b"]


def test_a_file_back_to_what_serves_clears_the_refusal_without_a_reload(tmp_path: Path) -> None:
    path = live_file(tmp_path, a={"sha256": digest_of("key-a"), "scopes": []})
    good = path.read_bytes()
    live = LiveRegistry(path, poll_s=0)
    path.write_text("{")
    live.check()
    assert refused_now() == 1
    path.write_bytes(good)
    assert not live.check()
    assert refused_now() == 0


async def test_the_watcher_serves_a_revocation_without_being_asked(tmp_path: Path) -> None:
    import asyncio
    import time

    a = {"sha256": digest_of("key-a"), "scopes": ["recommend"]}
    path = live_file(tmp_path, a=a)
    live = LiveRegistry(path, poll_s=0.05)
    await live.start()
    try:
        live_file(tmp_path, a={**a, "revoked": True})
        deadline = time.monotonic() + 10.0
        while live.registry.authenticate("key-a") is not None:
            assert time.monotonic() < deadline, "the revocation was not served within 10 s"
            await asyncio.sleep(0.01)
    finally:
        await live.stop()


def test_a_file_invalid_at_start_fails_the_start(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match="tenant file"):
        LiveRegistry(path)
