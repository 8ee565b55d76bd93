"""Every key of one tenant hashes to one cluster slot, the slot of the tenant's hash tag.

On a Valkey Cluster a Lua script, a transaction or an ``MGET`` may only name keys of one
slot, so every key function in :mod:`core.keys` must put the tenant in the key's hash tag,
for any owner (user, item, event id, request id, namespace). A key function added without
it fails here.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

import pytest
from redis.crc import key_slot

from core import keys

TENANTS = ("demo", "acme", "tenant-42", "t:with:colons")

KeyFunction = Callable[..., str]


def key_functions() -> list[KeyFunction]:
    """The public functions of :mod:`core.keys` (each names a key or a key's start)."""
    return [
        function
        for name, function in inspect.getmembers(keys, inspect.isfunction)
        if function.__module__ == keys.__name__ and not name.startswith("_")
    ]


def calls(function: KeyFunction, tenant: str) -> list[dict[str, object]]:
    """Arguments to call ``function`` with for ``tenant``: its defaults, then every
    parameter given, owners with braces of their own among them."""
    hints = typing.get_type_hints(function)
    required: dict[str, object] = {}
    everything: dict[str, object] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name == "tenant":
            value: object = tenant
        elif hints.get(name) is int or int in typing.get_args(hints.get(name)):
            value = 12345
        else:
            value = f"{name}-{{x}}:1"  # an owner that holds a hash tag of its own
        everything[name] = value
        if parameter.default is inspect.Parameter.empty:
            required[name] = value
    return [required, everything]


def test_there_are_key_functions_to_check() -> None:
    names = {function.__name__ for function in key_functions()}
    assert {"events", "item_row", "user_row", "trending", "snapshot"} <= names


@pytest.mark.parametrize("tenant", TENANTS)
def test_every_key_of_a_tenant_is_in_the_slot_of_its_hash_tag(tenant: str) -> None:
    slot = key_slot(tenant.encode())
    for function in key_functions():
        for arguments in calls(function, tenant):
            key = function(**arguments)
            assert key.startswith(keys.tenant_prefix(tenant)), (function.__name__, key)
            assert key_slot(key.encode()) == slot, (function.__name__, arguments, key)


def test_tenants_are_spread_over_slots() -> None:
    """Different tenants' keys land in different slots (here: all four differ), so a
    cluster spreads tenants over its masters."""
    assert len({key_slot(keys.events(t).encode()) for t in TENANTS}) == len(TENANTS)
