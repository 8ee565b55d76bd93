"""The tenant registry: who may call, with which API keys and scopes, and at what rate.

Keys are stored as SHA-256 hex digests, never in clear. The file is JSON::

    {"tenants": {"demo": {"rate": 300, "burst": 600, "keys": [
        {"id": "k1f3a9c2e", "sha256": "<hex>", "scopes": ["recommend", "events"],
         "label": "web app", "created": "2026-12-05T01:00:00Z",
         "not_after": "2027-06-01T00:00:00Z", "revoked": false}]}}}

``rate`` is requests per second and ``burst`` the bucket size of the tenant's quota.
An optional ``retention_days`` (a positive number) bounds how long the tenant's event log
keeps its entries (``recmesh events trim`` and the projector snapshot the projections
first, so a rebuild still works); without it the log is kept.

A tenant has any number of keys, so two are valid at once while a client moves from one to
the other (``recmesh keys add``, then ``recmesh keys revoke``: ``ops/keys.py``). Each key
has an ``id`` (unique within its tenant; what logs, metrics and audit records name, never
the key), its ``sha256``, its ``scopes`` (:data:`SCOPES`), and optionally a ``label``, the
time it was ``created``, a ``not_after`` time from which it is refused, and ``revoked``.
Times are ISO 8601; one without an offset is UTC. A key's digest belongs to one key of one
tenant only.

The older form, ``"api_key_sha256": "<hex>"`` in place of ``keys``, is still read: one key
with id ``legacy`` and every scope, which is what such a key could do before scopes existed.

A scope is what a key may do (``docs/security.md``, "API keys: rotation, revocation,
scopes"): ``recommend`` (recommendations), ``events`` (posting events), ``catalog``
(writing and withdrawing items: a write changes what every user of the tenant is served,
so a key that posts events from a client app does not get it by default) and ``admin``
(experiment reports, erasing a user). No scope implies another.

:class:`LiveRegistry` serves the registry of a file and swaps in the file's new content
when it changes (a background task stats it every ``RECMESH_TENANTS_POLL_S``); a file it
cannot read or that is invalid is refused, logged and counted, and the previous registry
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from mesh.context import API_KEY, tenant_var, validate_tenant
from mesh.errors import ConfigError, InvalidArgument, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

RECOMMEND = "recommend"
EVENTS = "events"
CATALOG = "catalog"
ADMIN = "admin"
SCOPES: tuple[str, ...] = (RECOMMEND, EVENTS, CATALOG, ADMIN)
"""Every scope a key can have (the module docstring says what each allows)."""

LEGACY_KEY_ID = "legacy"
"""The id of the one key of a tenant written in the older ``api_key_sha256`` form."""

ACTIVE, REVOKED, EXPIRED = "active", "revoked", "expired"
"""A key's state at a given time (:meth:`ApiKey.state`)."""

MAX_KEY_ID_LEN = 64
MAX_LABEL_LEN = 100
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_TENANT_FIELDS = {"rate", "burst"}
_TENANT_OPTIONAL = {"retention_days"}
_KEY_FORMS = ("keys", "api_key_sha256")
_KEY_FIELDS = {"id", "sha256", "scopes"}
_KEY_OPTIONAL = {"label", "created", "not_after", "revoked"}

AUTH_FAILURES = Counter(
    "recmesh_auth_failures_total",
    "Requests refused when their API key was checked, by reason (missing, unknown, revoked, "
    "expired, scope) and tenant ('-' when no key of a tenant matched); never the key",
    ["reason", "tenant"],
)
KEYS_ADMITTED = Counter(
    "recmesh_api_key_admitted_total",
    "Requests admitted, by tenant and key id: a key whose count stopped growing is no "
    "longer used, and safe to revoke",
    ["tenant", "key_id"],
)
RELOADS = Counter(
    "recmesh_tenants_reloads_total",
    "Changed tenant files seen, by outcome: loaded (served from then on) or refused "
    "(unreadable or invalid: the registry loaded before keeps serving)",
    ["outcome"],
)
FILE_REFUSED = Gauge(
    "recmesh_tenants_file_refused",
    "1 while the tenant file on disk is refused and an older registry serves, else 0",
)


def digest_of(api_key: str) -> str:
    """The SHA-256 hex digest of an API key, as the tenant file stores it."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (UTC when it has no offset).

    Raises:
        ValueError: not an ISO 8601 time.
    """
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 UTC, to the second (``2026-12-05T01:44:47Z``)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ApiKey:
    """One API key of a tenant, by its digest (the key itself is never stored).

    Attributes:
        key_id: unique within the tenant; logs, metrics and audit records name it.
        sha256: hex digest of the key.
        scopes: what the key may do (a subset of :data:`SCOPES`).
        label: free text for people (``recmesh keys list``).
        created: when it was made, seconds since the epoch (None: not recorded).
        not_after: from this time on (seconds since the epoch) it is refused as expired.
        revoked: refused from the moment the file saying so is loaded.
    """

    key_id: str
    sha256: str
    scopes: frozenset[str]
    label: str = ""
    created: float | None = None
    not_after: float | None = None
    revoked: bool = False

    def state(self, now: float) -> str:
        """:data:`ACTIVE`, :data:`REVOKED` or :data:`EXPIRED` at ``now`` (epoch seconds)."""
        if self.revoked:
            return REVOKED
        if self.not_after is not None and now >= self.not_after:
            return EXPIRED
        return ACTIVE


@dataclass(frozen=True)
class Tenant:
    name: str
    rate: float
    burst: int
    retention_days: float | None = None
    keys: tuple[ApiKey, ...] = ()


@dataclass(frozen=True)
class Caller:
    """Who a request was admitted as: the tenant and the key it presented."""

    tenant: Tenant
    key: ApiKey


class Tenants(Protocol):
    """What serving code reads of a registry: a fixed one (:class:`TenantRegistry`) or the
    one of a watched file (:class:`LiveRegistry`)."""

    @property
    def tenants(self) -> Mapping[str, Tenant]: ...

    def get(self, name: str) -> Tenant | None: ...

    def admit(self, api_key: str, carrier: str, scope: str) -> Caller: ...


_REFUSALS = {
    "missing": "missing or unknown {key} {carrier}",
    "unknown": "missing or unknown {key} {carrier}",
    REVOKED: "the {key} {carrier} names a revoked key",
    EXPIRED: "the {key} {carrier} names an expired key",
}


@dataclass(frozen=True)
class TenantRegistry:
    """Tenants by name, and their keys by digest.

    Args:
        tenants: tenants by name.
        clock: wall-clock seconds since the epoch, for keys' ``not_after`` (tests pass
            their own).

    Raises:
        ConfigError: two keys with the same digest.
    """

    tenants: Mapping[str, Tenant]
    clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)
    _by_digest: dict[str, Caller] = field(
        init=False, default_factory=dict, compare=False, repr=False
    )
    """Each key's :class:`Caller`, made once here rather than per request."""
    _uses: dict[str, Any] = field(init=False, default_factory=dict, compare=False, repr=False)
    """:data:`KEYS_ADMITTED`'s child of each key used (``labels()`` costs microseconds)."""

    def __post_init__(self) -> None:
        for tenant in self.tenants.values():
            for key in tenant.keys:
                if (other := self._by_digest.get(key.sha256)) is not None:
                    raise ConfigError(
                        f"key {key.key_id!r} of tenant {tenant.name!r} has the digest of key "
                        f"{other.key.key_id!r} of tenant {other.tenant.name!r}: a key is one key"
                    )
                self._by_digest[key.sha256] = Caller(tenant, key)

    def authenticate(self, api_key: str) -> Tenant | None:
        """The tenant with an active key whose digest is the digest of ``api_key``."""
        found = self._by_digest.get(digest_of(api_key))
        if found is None or found.key.state(self.clock()) != ACTIVE:
            return None
        return found.tenant

    def admit(self, api_key: str, carrier: str, scope: str) -> Caller:
        """Admit a request of either API that needs ``scope``: the tenant that owns
        ``api_key`` becomes the request's tenant (``tenant_var``: logs, metrics, spans,
        downstream metadata). A refused key leaves the request without a tenant.

        The key is found by its SHA-256 digest in a dict: what the lookup's time could tell
        is about the digest of the key sent, and a digest does not lead back to a key.

        Args:
            api_key: the ``x-api-key`` value sent, empty when none was.
            carrier: where the key travels, for the error ("header", "metadata").
            scope: what the request does (one of :data:`SCOPES`).

        Raises:
            Unauthenticated: no key, or one that belongs to no tenant, or is revoked or
                expired (401 / UNAUTHENTICATED).
            PermissionDenied: the key lacks ``scope`` (403 / PERMISSION_DENIED); the
                message names the scope. The request's tenant is set: it is the tenant's.
        """
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        found = self._by_digest.get(digest_of(api_key)) if api_key else None
        if found is None:
            reason = "unknown" if api_key else "missing"
        else:
            reason = found.key.state(self.clock())
        if found is None or reason != ACTIVE:
            tenant_var.set("")
            AUTH_FAILURES.labels(reason, found.tenant.name if found else "-").inc()
            raise Unauthenticated(_REFUSALS[reason].format(key=API_KEY, carrier=carrier))
        tenant, key = found.tenant, found.key
        tenant_var.set(tenant.name)
        if scope not in key.scopes:
            AUTH_FAILURES.labels("scope", tenant.name).inc()
            raise PermissionDenied(
                f"the {API_KEY} {carrier} lacks the {scope!r} scope (key {key.key_id!r} has "
                f"{', '.join(sorted(key.scopes)) or 'none'})"
            )
        uses = self._uses.get(key.sha256)
        if uses is None:
            uses = self._uses[key.sha256] = KEYS_ADMITTED.labels(tenant.name, key.key_id)
        uses.inc()
        return found

    def get(self, name: str) -> Tenant | None:
        return self.tenants.get(name)


def _number(spec: Mapping[str, Any], name: str, where: str, *, integer: bool = False) -> float:
    value = spec[name]
    kind, what = (int, "integer") if integer else (int | float, "number")
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(f"{where}: {name} must be a positive {what}")
    return float(value)


def _digest(value: Any, where: str, name: str) -> str:
    if (
        not isinstance(value, str)
        or len(value) != 64
        or any(c not in "0123456789abcdefABCDEF" for c in value)
    ):
        raise ConfigError(f"{where}: {name} must be 64 hex characters")
    return value.lower()


def _time(spec: Mapping[str, Any], name: str, where: str) -> float | None:
    value = spec.get(name)
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        return parse_time(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {name} must be an ISO 8601 time ({exc})") from exc


def _key(spec: Any, where: str) -> ApiKey:
    if not isinstance(spec, dict) or not _KEY_FIELDS <= set(spec) <= _KEY_FIELDS | _KEY_OPTIONAL:
        raise ConfigError(
            f"{where}: a key must have exactly {sorted(_KEY_FIELDS)} and may have "
            f"{sorted(_KEY_OPTIONAL)}"
        )
    key_id = spec["id"]
    if not isinstance(key_id, str) or len(key_id) > MAX_KEY_ID_LEN or not _KEY_ID.fullmatch(key_id):
        raise ConfigError(
            f"{where}: key id {key_id!r} must be 1..{MAX_KEY_ID_LEN} of [A-Za-z0-9_.-]"
        )
    where = f"{where} key {key_id!r}"
    scopes = spec["scopes"]
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ConfigError(f"{where}: scopes must be a list of {', '.join(SCOPES)}")
    if unknown := sorted(set(scopes) - set(SCOPES)):
        raise ConfigError(f"{where}: unknown scopes {unknown} (known: {', '.join(SCOPES)})")
    label = spec.get("label", "")
    if not isinstance(label, str) or len(label) > MAX_LABEL_LEN:
        raise ConfigError(f"{where}: label must be a string of at most {MAX_LABEL_LEN} characters")
    revoked = spec.get("revoked", False)
    if not isinstance(revoked, bool):
        raise ConfigError(f"{where}: revoked must be true or false")
    return ApiKey(
        key_id,
        _digest(spec["sha256"], where, "sha256"),
        frozenset(scopes),
        label,
        _time(spec, "created", where),
        _time(spec, "not_after", where),
        revoked,
    )


def _keys(spec: Mapping[str, Any], where: str) -> tuple[ApiKey, ...]:
    if "api_key_sha256" in spec:
        digest = _digest(spec["api_key_sha256"], where, "api_key_sha256")
        return (ApiKey(LEGACY_KEY_ID, digest, frozenset(SCOPES)),)
    if not isinstance(spec["keys"], list):
        raise ConfigError(f"{where}: keys must be a list")
    keys = tuple(_key(entry, where) for entry in spec["keys"])
    ids = [key.key_id for key in keys]
    if duplicated := sorted({i for i in ids if ids.count(i) > 1}):
        raise ConfigError(f"{where}: key ids {duplicated} appear more than once")
    return keys


def parse_registry(
    document: Any, source: str, clock: Callable[[], float] = time.time
) -> TenantRegistry:
    """A registry from a tenant file's JSON ``document`` (``source`` names it in errors).

    Raises:
        ConfigError: unknown or missing fields, bad values, a key digest used twice; the
            message names the tenant, the key and the field.
    """
    if not isinstance(document, dict) or not isinstance(document.get("tenants"), dict):
        raise ConfigError(f"tenant file {source}: expected an object with a 'tenants' object")
    tenants: dict[str, Tenant] = {}
    for name, spec in document["tenants"].items():
        try:
            validate_tenant(name)
        except InvalidArgument as exc:
            raise ConfigError(f"tenant file {source}: tenant name {name!r} is invalid") from exc
        allowed = _TENANT_FIELDS | _TENANT_OPTIONAL | set(_KEY_FORMS)
        if (
            not isinstance(spec, dict)
            or not _TENANT_FIELDS <= set(spec) <= allowed
            or sum(form in spec for form in _KEY_FORMS) != 1
        ):
            raise ConfigError(
                f"tenant file {source}: tenant {name!r} must have exactly "
                f"{sorted(_TENANT_FIELDS)} and one of {' or '.join(_KEY_FORMS)},"
                f" and may have {sorted(_TENANT_OPTIONAL)}"
            )
        where = f"tenant {name!r}"
        rate = _number(spec, "rate", where)
        burst = int(_number(spec, "burst", where, integer=True))
        retention = (
            _number(spec, "retention_days", where)
            if spec.get("retention_days") is not None
            else None
        )
        tenants[name] = Tenant(name, rate, burst, retention, _keys(spec, where))
    if not tenants:
        raise ConfigError(f"tenant file {source}: no tenants")
    return TenantRegistry(tenants, clock)


def _read(path: Path) -> tuple[bytes, Any]:
    try:
        raw = path.read_bytes()
        return raw, json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tenant file {path}: {exc}") from exc


def load_tenants(path: Path, clock: Callable[[], float] = time.time) -> TenantRegistry:
    """Read and validate a tenant file.

    Raises:
        ConfigError: unreadable file, unknown or missing fields, bad values; the message
            names the tenant and the field.
    """
    return parse_registry(_read(path)[1], str(path), clock)


RACY_NS = 1_000_000_000
"""A file modified less than this long ago (ns) is read again at the next look, whatever
its signature: file times advance in clock ticks of a few milliseconds, so a second write
of the same size within the tick of a read would keep the signature ("racily clean", as
git calls it)."""


def _signature(path: Path) -> tuple[int, ...] | None:
    """What changes when the file is written or replaced (None: it cannot be stat'ed, or
    it changed too recently to trust its times: :data:`RACY_NS`). ``os.stat`` follows
    symlinks: a Kubernetes ConfigMap mount swaps the link's target."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if time.time_ns() - st.st_mtime_ns < RACY_NS:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _changes(old: TenantRegistry, new: TenantRegistry) -> list[str]:
    """What a reload changed, for its log line: tenants, limits, keys (by id, never digest)."""
    now = new.clock()
    changes = [f"{name}: added" for name in new.tenants if name not in old.tenants]
    changes += [f"{name}: removed" for name in old.tenants if name not in new.tenants]
    for name, tenant in new.tenants.items():
        before = old.tenants.get(name)
        if before is None:
            continue
        for attribute in ("rate", "burst", "retention_days"):
            if (was := getattr(before, attribute)) != (now_is := getattr(tenant, attribute)):
                changes.append(f"{name}: {attribute} {was} -> {now_is}")
        keys_before = {k.key_id: k for k in before.keys}
        for key in tenant.keys:
            previous = keys_before.pop(key.key_id, None)
            if previous is None:
                changes.append(f"{name}/{key.key_id}: added ({key.state(now)})")
            elif previous != key:
                changes.append(f"{name}/{key.key_id}: changed ({key.state(now)})")
        changes += [f"{name}/{key_id}: removed" for key_id in keys_before]
    return changes


class LiveRegistry:
    """The registry of the tenant file at ``path``, replaced when the file changes.

    :meth:`start` runs a task that stats the file every ``poll_s`` seconds (a few
    microseconds each; nothing is done per request), and reads and parses a changed file
    in a worker thread. When the file changed (device, inode,
    size, modification or change time; or it changed in the last second, when those are
    not to be trusted) it is read, and when its content differs from the registry's it is
    parsed; a valid file replaces the registry in one assignment, so a request sees the old
    or the new registry, never a mix. A file that cannot be read or is invalid (a partial
    write, a typo) is refused: logged once per content, counted
    (``recmesh_tenants_reloads_total{outcome="refused"}``,
    ``recmesh_tenants_file_refused``), and the registry loaded before keeps serving; while
    refused, the file is read again at every poll, so its fix is seen even when the
    change keeps its size and time stamp.

    Args:
        path: the tenant file; it is loaded now.
        poll_s: seconds between looks at the file; 0 or less: read once.
        clock: wall-clock seconds since the epoch, for keys' ``not_after``.

    Raises:
        ConfigError: the file is unreadable or invalid now (a process fails to start).
    """

    def __init__(
        self, path: Path, poll_s: float = 0.5, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.poll_s = poll_s
        self._clock = clock
        self._seen = _signature(path)  # before the read: a write after it is seen next time
        raw, document = _read(path)
        self._registry = parse_registry(document, str(path), clock)
        self._loaded = hashlib.sha256(raw).digest()
        self._refused: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        FILE_REFUSED.set(0)

    @property
    def registry(self) -> TenantRegistry:
        """The registry serving now."""
        return self._registry

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        return self._registry.tenants

    def get(self, name: str) -> Tenant | None:
        return self._registry.tenants.get(name)

    def admit(self, api_key: str, carrier: str, scope: str) -> Caller:
        """:meth:`TenantRegistry.admit` on the registry serving now."""
        return self._registry.admit(api_key, carrier, scope)

    def check(self) -> bool:
        """Look at the file once and load it if it changed; True when a new registry
        serves from now on. Never raises for the file's sake: a bad file is refused."""
        signature = _signature(self.path)
        if signature is not None and signature == self._seen and self._refused is None:
            return False
        self._seen = signature
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            return self._refuse(b"unreadable", f"tenant file {self.path}: {exc}")
        digest = hashlib.sha256(raw).digest()
        if digest == self._loaded:  # touched, or back to what serves after a refusal
            self._refused = None
            FILE_REFUSED.set(0)
            return False
        if digest == self._refused:
            return False
        try:
            registry = parse_registry(json.loads(raw), str(self.path), self._clock)
        except ValueError as exc:  # not JSON, or not UTF-8
            return self._refuse(digest, f"tenant file {self.path}: {exc}")
        except ConfigError as exc:
            return self._refuse(digest, exc.message)
        previous, self._registry, self._loaded = self._registry, registry, digest
        self._refused = None
        FILE_REFUSED.set(0)
        RELOADS.labels("loaded").inc()
        changes = _changes(previous, registry)
        log.info(
            "tenant file reloaded: %s",
            "; ".join(changes) or "no change",
            extra={
                "fields": {
                    "event": "tenants_reloaded",
                    "path": str(self.path),
                    "tenants": len(registry.tenants),
                    "changes": changes,
                }
            },
        )
        return True

    def _refuse(self, content: bytes, message: str) -> bool:
        if content != self._refused:
            self._refused = content
            RELOADS.labels("refused").inc()
            log.error(
                "tenant file refused; the registry loaded before keeps serving: %s",
                message,
                extra={"fields": {"event": "tenants_refused", "path": str(self.path)}},
            )
        FILE_REFUSED.set(1)
        return False

    def _may_have_changed(self) -> bool:
        signature = _signature(self.path)
        return signature is None or signature != self._seen or self._refused is not None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                # The stat here, the read and parse in a worker thread: a registry of
                # thousands of tenants takes a good part of a second to parse, and the
                # event loop keeps serving meanwhile (the new registry is one assignment).
                if self._may_have_changed():
                    await asyncio.to_thread(self.check)
            except Exception:  # the watcher must outlive any surprise; the registry serves
                log.exception("tenant file check failed; the registry in force keeps serving")

    async def start(self) -> None:
        """Watch the file in the background (unless ``poll_s`` <= 0)."""
        if self.poll_s > 0 and self._task is None:
            # A context of its own: no request's tenant or id labels the watcher's logs.
            self._task = asyncio.create_task(self._poll(), context=contextvars.Context())

    async def stop(self) -> None:
        """Stop watching."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
