"""``recmesh keys add|revoke|list``: a round trip through the tenant file, as the services
read it; a legacy tenant converted on its first edit; nothing invalid ever written."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from mesh.errors import ConfigError, PermissionDenied, Unauthenticated
from mesh.tenants import ADMIN, EVENTS, LEGACY_KEY_ID, RECOMMEND, digest_of, load_tenants
from ops import keys
from ops.cli import main


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A tenant file in the older form: demo's one key is ``demo-key``."""
    file = tmp_path / "tenants.json"
    file.write_text(
        json.dumps(
            {
                "tenants": {
                    "demo": {"api_key_sha256": digest_of("demo-key"), "rate": 10, "burst": 20},
                    "acme": {"api_key_sha256": digest_of("acme-key"), "rate": 5, "burst": 5},
                }
            }
        )
    )
    file.chmod(0o640)
    return file


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_revoke_round_trip(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "keys", "add", "--tenant", "demo", "--scopes", "events,recommend",
        "--label", "web app", "--file", str(path), "--json",
    )  # fmt: skip
    assert code == 0
    added = json.loads(out)
    api_key, key_id = added["api_key"], added["id"]
    assert api_key.startswith(keys.KEY_PREFIX) and len(api_key) > 40
    assert added["scopes"] == ["recommend", "events"]
    assert api_key not in path.read_text()  # only its digest is kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the rewrite keeps the mode

    registry = load_tenants(path)
    # Both keys admit the tenant: the rotation's overlap. The legacy key kept every scope.
    assert registry.admit(api_key, "header", EVENTS).key.key_id == key_id
    assert registry.admit("demo-key", "header", ADMIN).key.key_id == LEGACY_KEY_ID
    with pytest.raises(PermissionDenied, match="'admin'"):
        registry.admit(api_key, "header", ADMIN)
    assert registry.admit("acme-key", "header", ADMIN).tenant.name == "acme"  # untouched
    assert "api_key_sha256" in json.loads(path.read_text())["tenants"]["acme"]

    code, out, _ = run(capsys, "keys", "list", "--tenant", "demo", "--file", str(path), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["key_id"], r["state"], r["label"]) for r in rows] == [
        (LEGACY_KEY_ID, "active", "the tenant's key before keys had ids and scopes"),
        (key_id, "active", "web app"),
    ]
    assert digest_of(api_key) not in out

    code, out, err = run(
        capsys, "keys", "revoke", "--tenant", "demo", "--key-id", LEGACY_KEY_ID,
        "--file", str(path),
    )  # fmt: skip
    assert code == 0 and "revoked" in out and err == ""
    registry = load_tenants(path)
    with pytest.raises(Unauthenticated, match="revoked"):
        registry.admit("demo-key", "header", RECOMMEND)
    assert registry.admit(api_key, "header", RECOMMEND).tenant.name == "demo"

    code, out, _ = run(capsys, "keys", "list", "--file", str(path))
    table = out.splitlines()
    assert table[0].split()[:4] == ["tenant", "key", "id", "state"]
    assert any(line.split()[:3] == ["demo", LEGACY_KEY_ID, "revoked"] for line in table)
    assert any(line.split()[:3] == ["acme", LEGACY_KEY_ID, "active"] for line in table)


def test_revoking_the_last_active_key_warns(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("keys", "revoke", "--tenant", "acme", "--key-id", LEGACY_KEY_ID, "--file", str(path))
    code, out, err = run(capsys, *argv)
    assert code == 0 and "no active key left" in err
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "was revoked already" in out


def test_an_expiry_is_stored_and_honoured(path: Path) -> None:
    api_key, entry = keys.add_key(path, "demo", [RECOMMEND], not_after=1_000.0, now=500.0)
    assert (entry["created"], entry["not_after"]) == (
        "1970-01-01T00:08:20Z",
        "1970-01-01T00:16:40Z",
    )
    with pytest.raises(Unauthenticated, match="expired"):
        load_tenants(path).admit(api_key, "header", RECOMMEND)
    assert load_tenants(path, clock=lambda: 999.0).admit(api_key, "header", RECOMMEND)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("add", "--tenant", "nobody", "--scopes", "events"), "no tenant 'nobody'"),
        (("revoke", "--tenant", "demo", "--key-id", "nope"), "has no key 'nope'"),
        (("list", "--tenant", "nobody"), "no tenant 'nobody'"),
    ],
)
def test_a_bad_request_changes_nothing(
    path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    before = path.read_bytes()
    code, _, err = run(capsys, "keys", *argv, "--file", str(path))
    assert code == 1 and message in err
    assert path.read_bytes() == before


def test_unknown_scopes_are_refused_by_the_parser(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["keys", "add", "--tenant", "demo", "--scopes", "events,all", "--file", str(path)])
    assert "unknown scopes all" in capsys.readouterr().err


def test_an_edit_the_services_would_refuse_is_not_written(path: Path) -> None:
    before = path.read_bytes()

    def break_it(document: dict[str, object]) -> None:
        document["tenants"] = {}

    with pytest.raises(ConfigError, match="no tenants"):
        keys.edit(path, break_it)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))
