"""``recmesh keys add|revoke|list``: a tenant's API keys, in the tenant file.

``recmesh keys add --tenant T --scopes recommend,events [--label L] [--not-after TIME]``
makes a key (``rmk_`` and 32 random bytes, URL-safe base64), stores its SHA-256 digest with
a new key id in the tenant file and prints the key once: it is not stored anywhere.
``recmesh keys revoke --tenant T --key-id K`` marks a key revoked; ``recmesh keys list``
shows every key's id, state (active, revoked, expired), scopes, times and label, never a
digest. The running gateways and quota services read the changed file within
``RECMESH_TENANTS_POLL_S`` (``mesh.tenants.LiveRegistry``), no restart.

The file is ``--file`` or ``RECMESH_TENANTS``. An edit holds an exclusive lock (a
``.<name>.lock`` file next to it) while it reads, changes and checks the document (the
services' own parser: nothing they would refuse is written), then writes a temporary file
and renames it over the old one, so a reader sees the old or the new file, never part of
one. A tenant in the older ``api_key_sha256`` form is rewritten with that key as key
``legacy`` (every scope) the first time one of its keys is edited; other tenants are left
as they were (the file is written as indented JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mesh.errors import ConfigError
from mesh.tenants import (
    ACTIVE,
    LEGACY_KEY_ID,
    MAX_LABEL_LEN,
    SCOPES,
    TenantRegistry,
    digest_of,
    format_time,
    load_tenants,
    parse_registry,
    parse_time,
)
from ops.settings import OpsSettings

KEY_PREFIX = "rmk_"
"""What every key ``recmesh keys add`` makes starts with (so secret scanners can find one)."""

T = TypeVar("T")


def new_api_key() -> str:
    """A fresh API key: :data:`KEY_PREFIX` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(scratch, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(scratch, path.stat().st_mode & 0o777)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def edit(path: Path, change: Callable[[dict[str, Any]], T]) -> T:
    """Apply ``change`` to the tenant file's document under the file's lock, check the
    result as the services would, and replace the file with it; what ``change`` returned.

    Raises:
        ConfigError: the file is unreadable or invalid, ``change`` refused, or the changed
            document would be refused by the services (then the file is left as it was).
    """
    with _locked(path):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tenant file {path}: {exc}") from exc
        result = change(document)
        parse_registry(document, str(path))
        _write_atomically(path, json.dumps(document, indent=2) + "\n")
    return result


def _tenant_keys(document: dict[str, Any], tenant: str) -> list[dict[str, Any]]:
    """The ``keys`` list of ``tenant`` in ``document``, its legacy key moved into it."""
    tenants = document.get("tenants")
    spec = tenants.get(tenant) if isinstance(tenants, dict) else None
    if not isinstance(spec, dict):
        raise ConfigError(f"no tenant {tenant!r} in the tenant file")
    if "api_key_sha256" in spec:
        spec["keys"] = [
            {
                "id": LEGACY_KEY_ID,
                "sha256": spec.pop("api_key_sha256"),
                "scopes": list(SCOPES),
                "label": "the tenant's key before keys had ids and scopes",
            }
        ]
    keys = spec.get("keys")
    if not isinstance(keys, list):
        raise ConfigError(f"tenant {tenant!r}: keys must be a list")
    return keys


def add_key(
    path: Path,
    tenant: str,
    scopes: list[str],
    label: str = "",
    not_after: float | None = None,
    now: float | None = None,
) -> tuple[str, dict[str, Any]]:
    """Make a key for ``tenant`` with ``scopes`` and store its digest in the file at
    ``path``; the key (shown once, stored nowhere) and its entry in the file.

    Raises:
        ConfigError: no such tenant, unknown scopes, a bad label, or a file the services
            would refuse.
    """
    api_key = new_api_key()
    created = time.time() if now is None else now

    if unknown := sorted(set(scopes) - set(SCOPES)):
        raise ConfigError(f"unknown scopes {unknown} (known: {', '.join(SCOPES)})")

    def change(document: dict[str, Any]) -> dict[str, Any]:
        keys = _tenant_keys(document, tenant)
        taken = {entry.get("id") for entry in keys if isinstance(entry, dict)}
        key_id = "k" + secrets.token_hex(4)
        while key_id in taken:
            key_id = "k" + secrets.token_hex(4)
        entry: dict[str, Any] = {
            "id": key_id,
            "sha256": digest_of(api_key),
            "scopes": [scope for scope in SCOPES if scope in scopes],
            "created": format_time(created),
        }
        if label:
            entry["label"] = label
        if not_after is not None:
            entry["not_after"] = format_time(not_after)
        keys.append(entry)
        return entry

    return api_key, edit(path, change)


def revoke_key(path: Path, tenant: str, key_id: str) -> bool:
    """Mark key ``key_id`` of ``tenant`` revoked in the file at ``path``; False when it
    was revoked already (the file is then rewritten unchanged).

    Raises:
        ConfigError: no such tenant or key, or a file the services would refuse.
    """

    def change(document: dict[str, Any]) -> bool:
        for entry in _tenant_keys(document, tenant):
            if isinstance(entry, dict) and entry.get("id") == key_id:
                was = entry.get("revoked") is True
                entry["revoked"] = True
                return not was
        raise ConfigError(f"tenant {tenant!r} has no key {key_id!r}")

    return edit(path, change)


def key_rows(
    registry: TenantRegistry, tenant: str | None = None, now: float | None = None
) -> list[dict[str, Any]]:
    """One row per key (of ``tenant``, or of every tenant): what ``keys list`` shows.

    Raises:
        ConfigError: ``tenant`` is not in the registry.
    """
    if tenant is not None and tenant not in registry.tenants:
        raise ConfigError(f"no tenant {tenant!r} in the tenant file")
    moment = time.time() if now is None else now
    return [
        {
            "tenant": t.name,
            "key_id": key.key_id,
            "state": key.state(moment),
            "scopes": [scope for scope in SCOPES if scope in key.scopes],
            "created": format_time(key.created) if key.created is not None else "",
            "not_after": format_time(key.not_after) if key.not_after is not None else "",
            "label": key.label,
        }
        for t in registry.tenants.values()
        if tenant is None or t.name == tenant
        for key in t.keys
    ]


def render_rows(rows: list[dict[str, Any]], as_json: bool) -> str:
    """``rows`` as JSON lines (``--json``) or as a table for a terminal."""
    if as_json:
        return "\n".join(json.dumps(row, sort_keys=True) for row in rows)
    header = ("tenant", "key id", "state", "scopes", "created", "not after", "label")
    table = [header] + [
        (
            row["tenant"],
            row["key_id"],
            row["state"],
            ",".join(row["scopes"]) or "-",
            row["created"] or "-",
            row["not_after"] or "-",
            row["label"],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + "  "
        + line[-1]
        for line in table
    ).rstrip()


def _file(args: argparse.Namespace, settings: OpsSettings) -> Path:
    chosen: Path | None = args.file
    return chosen if chosen is not None else settings.tenants


def cmd_add(args: argparse.Namespace, settings: OpsSettings) -> int:
    path = _file(args, settings)
    api_key, entry = add_key(path, args.tenant, args.scopes, args.label, args.not_after)
    if args.json:
        print(json.dumps({"tenant": args.tenant, "api_key": api_key, **entry}, sort_keys=True))
        return 0
    until = f", until {entry['not_after']}" if "not_after" in entry else ""
    print(
        f"tenant {args.tenant}: key {entry['id']} added "
        f"(scopes {', '.join(entry['scopes'])}{until})"
    )
    print(f"the key, shown this once (only its SHA-256 is kept, in {path}):")
    print(api_key)
    print(
        "running gateways accept it once they read the file (RECMESH_TENANTS_POLL_S, "
        "about half a second); revoke the key it replaces when no client uses that one"
    )
    return 0


def cmd_revoke(args: argparse.Namespace, settings: OpsSettings) -> int:
    path = _file(args, settings)
    revoked = revoke_key(path, args.tenant, args.key_id)
    state = "revoked" if revoked else "was revoked already"
    print(f"tenant {args.tenant}: key {args.key_id} {state} in {path}")
    keys = load_tenants(path).tenants[args.tenant].keys
    if all(key.state(time.time()) != ACTIVE for key in keys):
        print(f"warning: tenant {args.tenant} has no active key left", file=sys.stderr)
    print("running gateways refuse it once they read the file (RECMESH_TENANTS_POLL_S)")
    return 0


def cmd_list(args: argparse.Namespace, settings: OpsSettings) -> int:
    rows = key_rows(load_tenants(_file(args, settings)), args.tenant)
    print(render_rows(rows, args.json))
    return 0


def _scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    if not scopes:
        raise argparse.ArgumentTypeError("at least one scope")
    if unknown := sorted(set(scopes) - set(SCOPES)):
        raise argparse.ArgumentTypeError(
            f"unknown scopes {', '.join(unknown)} (known: {', '.join(SCOPES)})"
        )
    return scopes


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text}") from exc


def _label(text: str) -> str:
    if len(text) > MAX_LABEL_LEN:
        raise argparse.ArgumentTypeError(f"at most {MAX_LABEL_LEN} characters")
    return text


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys add|revoke|list`` to ``commands``."""
    keys = commands.add_parser(
        "keys", help="tenants' API keys: add, revoke, list (the tenant file)"
    ).add_subparsers(dest="keys_command", required=True)
    file_help = "the tenant file (default: RECMESH_TENANTS)"
    add = keys.add_parser("add", help="make a key, store its digest, print it once")
    add.add_argument("--tenant", required=True)
    add.add_argument(
        "--scopes",
        required=True,
        type=_scopes,
        help=f"comma-separated, of {', '.join(SCOPES)}",
    )
    add.add_argument("--label", default="", type=_label, help="free text for people")
    add.add_argument(
        "--not-after",
        type=_time,
        help="ISO 8601 time from which the key is refused (UTC when it has no offset)",
    )
    add.add_argument("--file", type=Path, help=file_help)
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(run=cmd_add)
    revoke = keys.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("--key-id", required=True, help="as `recmesh keys list` shows it")
    revoke.add_argument("--file", type=Path, help=file_help)
    revoke.set_defaults(run=cmd_revoke)
    listing = keys.add_parser("list", help="every key's id, state, scopes, times and label")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--file", type=Path, help=file_help)
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    listing.set_defaults(run=cmd_list)
