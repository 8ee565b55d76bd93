"""``recmesh projections verify|rebuild`` and ``recmesh events trim``: the operator's side
of the projector's projections (run against the deployment's Redis, with the projector's
half-life, history cap and group, read from the same variables the projector reads).

* ``verify``: the live projections against a recompute from the log (snapshot + tail).
* ``rebuild [--verify] [--from-start] [--keep]``: the log replayed through the projector's
  Lua into a fresh namespace (``rebuild-<time>``); ``--verify`` compares it with the live
  projections. The namespace is dropped afterwards unless ``--keep``.
* ``events trim``: snapshot and trim the log entries older than the tenant's retention
  (``retention_days`` in the tenant file, or ``--keep-days``); the projector does the same
  every ``RECMESH_PROJECTOR_RETENTION_EVERY_S``.

Each exits 1 when a tenant differs (or cannot be rebuilt), 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from mesh.tenants import TenantRegistry, load_tenants
from ops import supervisor
from ops.settings import OpsSettings
from services.projector import batch, rebuild
from services.projector.projections import Projections

T = TypeVar("T")
REBUILD_MARK_TTL_S = 86_400
"""Applied marks of a rebuild's namespace: they only need to outlive the rebuild, which
drops them with the namespace (``--keep`` leaves them to expire)."""
DAY_MS = 86_400_000


def _run(settings: OpsSettings, work: Callable[[AsyncRedis], Awaitable[T]]) -> T:
    url = supervisor.Layout.from_settings(settings).effective_redis_url()

    async def run() -> T:
        client = mesh_redis.client(url)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def _tenants(args: argparse.Namespace, settings: OpsSettings) -> tuple[list[str], TenantRegistry]:
    registry = load_tenants(settings.tenants)
    return ([args.tenant] if args.tenant else list(registry.tenants)), registry


def _report(found: dict[str, list[str]], agree: str) -> int:
    for tenant, lines in found.items():
        print(f"{tenant}: {f'{len(lines)} differences' if lines else agree}")
        for line in lines[:50]:
            print(f"  {line}")
    return 1 if any(found.values()) else 0


def cmd_verify(args: argparse.Namespace, settings: OpsSettings) -> int:
    tenants, _ = _tenants(args, settings)
    found = _run(
        settings,
        lambda client: batch.verify(client, tenants, settings.half_life_s, settings.history_cap),
    )
    return _report(found, "equal to a recompute from the log")


def cmd_rebuild(args: argparse.Namespace, settings: OpsSettings) -> int:
    tenants, _ = _tenants(args, settings)
    namespace = args.namespace or f"rebuild-{int(time.time())}"

    async def work(client: AsyncRedis) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        into = Projections(
            client,
            settings.history_cap,
            settings.half_life_s,
            REBUILD_MARK_TTL_S,
            namespace=namespace,
        )
        for tenant in tenants:
            try:
                done = await rebuild.rebuild(
                    client, tenant, into, settings.half_life_s, not args.from_start
                )
            except ValueError as exc:
                found[tenant] = [str(exc)]
                continue
            start = f"snapshot {done.snapshot_position} + " if done.snapshot_position else ""
            print(
                f"{tenant}: rebuilt into {namespace} from {start}{done.replayed} log entries "
                f"({done.dead} dead) in {done.seconds:.2f} s"
            )
            if args.verify:
                found[tenant] = batch.compare(
                    await batch.read_projections(client, tenant),
                    await batch.read_projections(client, tenant, namespace),
                    settings.half_life_s,
                )
            if not args.keep:
                await rebuild.drop_namespace(client, tenant, namespace)
        return found

    found = _run(settings, work)
    return _report(found, "the rebuild equals the live projections") if found else 0


def cmd_trim(args: argparse.Namespace, settings: OpsSettings) -> int:
    tenants, registry = _tenants(args, settings)
    now_ms = int(time.time() * 1000)

    async def work(client: AsyncRedis) -> dict[str, dict[str, object]]:
        done: dict[str, dict[str, object]] = {}
        for tenant in tenants:
            spec = registry.get(tenant)
            days = args.keep_days or (spec.retention_days if spec else None)
            if days is None:
                done[tenant] = {"trimmed": 0, "why": "no retention set"}
                continue
            trimmed = await rebuild.trim(
                client,
                tenant,
                now_ms - int(days * DAY_MS),
                settings.projector_group,
                settings.half_life_s,
                settings.history_cap,
            )
            done[tenant] = {"trimmed": trimmed.removed, "snapshot": trimmed.position}
        return done

    for tenant, outcome in _run(settings, work).items():
        print(f"{tenant}: {json.dumps(outcome)}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``projections ...`` to ``commands`` (``events trim`` is added by
    :func:`register_trim` under ``events``)."""
    projections = commands.add_parser(
        "projections", help="the projections of the event log"
    ).add_subparsers(dest="projections_command", required=True)
    check = projections.add_parser(
        "verify", help="compare the live projections with a recompute from the log"
    )
    check.add_argument("--tenant", help="one tenant (default: every tenant)")
    check.set_defaults(run=cmd_verify)
    again = projections.add_parser(
        "rebuild", help="replay the log into a fresh namespace (snapshot + tail)"
    )
    again.add_argument("--tenant", help="one tenant (default: every tenant)")
    again.add_argument("--verify", action="store_true", help="compare it with the live ones")
    again.add_argument(
        "--from-start", action="store_true", help="ignore the snapshot (refused after a trim)"
    )
    again.add_argument("--namespace", default="", help="name (default rebuild-<unix time>)")
    again.add_argument("--keep", action="store_true", help="keep the namespace afterwards")
    again.set_defaults(run=cmd_rebuild)


def register_trim(events: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``events trim`` to the ``events`` subcommands."""
    trim = events.add_parser(
        "trim", help="snapshot, then trim log entries older than the tenant's retention"
    )
    trim.add_argument("--tenant", help="one tenant (default: every tenant)")
    trim.add_argument(
        "--keep-days", type=float, default=None, help="override the tenant's retention_days"
    )
    trim.set_defaults(run=cmd_trim)
