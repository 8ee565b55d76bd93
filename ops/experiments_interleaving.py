"""``recmesh experiments interleaving <key> [--tenant T] [--json]``: which arm of an
interleaving experiment the clicks prefer, from the tenant's event log.

Reads the log from the mesh's Redis (``REDIS_URL``, else the embedded one ``recmesh up``
starts) and computes :func:`core.experiments.interleaving.preference_from_log`: per
request, wins of A, wins of B and ties; the preference ``(wins_A - wins_B) / (wins_A +
wins_B + ties)`` with the sign test on requests and on users and the users' bootstrap
interval (``docs/experiments.md``, "Interleaving"). The arms are the experiment's two
variants in the book (``RECMESH_EXPERIMENTS``), A first. Without ``--tenant``, the tenant
is the one tenant of the registry the book declares the experiment for. Exit status 1 when
the book has no such interleaving experiment, the tenant is ambiguous or Redis cannot be
read.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from redis.exceptions import RedisError

from core.experiments.book import load_experiments
from core.experiments.interleaving import Preference, preference_from_log
from mesh import redis as mesh_redis
from ops import supervisor
from ops.experiments_report import default_tenant
from ops.settings import OpsSettings


def arms(settings: OpsSettings, key: str) -> tuple[tuple[str, str] | None, str]:
    """The variant keys of interleaving experiment ``key`` (A, B), or (None, why not)."""
    book = load_experiments(settings.experiments)
    experiment = next((e for e in book.experiments if e.key == key), None)
    if experiment is None:
        return None, f"the book {settings.experiments} has no experiment {key!r}"
    if experiment.type != "interleave":
        return None, (
            f"experiment {key!r} is an A/B experiment: see `recmesh experiments report {key}`"
        )
    a, b = experiment.variants
    return (a.key, b.key), ""


async def compute(redis_url: str, tenant: str, key: str, pair: tuple[str, str]) -> Preference:
    """The preference of experiment ``key`` from ``tenant``'s log at ``redis_url``.

    Raises:
        RedisError: Redis cannot be read.
    """
    client = mesh_redis.client(redis_url)
    try:
        return await preference_from_log(client, tenant, key, pair)
    finally:
        await client.aclose()


def render(found: Preference, key: str, tenant: str) -> list[str]:
    """The preference as lines for a terminal."""
    a, b = found.arms
    favoured = a if found.preference > 0 else b if found.preference < 0 else "neither"
    interval = (
        f"[{found.ci[0]:+.3f}, {found.ci[1]:+.3f}] ({found.confidence:.0%}, bootstrap over users)"
        if found.ci is not None
        else "not computed (fewer than 2 users clicked)"
    )
    return [
        f"interleaving experiment {key!r} of tenant {tenant!r}: A = {a}, B = {b}",
        f"  requests       {found.requests} interleaved, {found.clicked_requests} with a click",
        f"  wins           A {found.wins_a}, B {found.wins_b}, ties {found.ties}",
        f"  preference     {found.preference:+.4f} (favours {favoured}); interval {interval}",
        f"  sign test      requests p = {found.p_value:.4g}; users p = {found.user_p_value:.4g} "
        f"(A {found.users_a}, B {found.users_b}, tied {found.users_tied} of {found.users} users)",
    ]


def cmd_interleaving(args: argparse.Namespace, settings: OpsSettings) -> int:
    pair, why = arms(settings, args.key)
    if pair is None:
        print(f"error: {why}")
        return 1
    tenant: str = args.tenant
    if not tenant:
        tenant, why = default_tenant(settings, args.key)
        if not tenant:
            print(f"error: {why}")
            return 1
    url = supervisor.Layout.from_settings(settings).effective_redis_url()
    try:
        found = asyncio.run(compute(url, tenant, args.key, pair))
    except RedisError as exc:
        print(f"error: cannot read the event log at {url}: {exc}")
        return 1
    if args.json:
        print(json.dumps({"experiment": args.key, "tenant": tenant, **found.as_dict()}, indent=2))
    else:
        print("\n".join(render(found, args.key, tenant)))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``experiments interleaving`` to the ``experiments`` command of ``commands``
    (created by :func:`ops.experiments_report.register`, which must run first)."""
    experiments = commands.choices["experiments"]
    subcommands = next(
        action for action in experiments._actions if isinstance(action, argparse._SubParsersAction)
    )
    found = subcommands.add_parser(
        "interleaving",
        help="which arm of an interleaving experiment the clicks prefer, from the event log",
    )
    found.add_argument("key", help="the interleaving experiment's key in the experiment book")
    found.add_argument(
        "--tenant", default="", help="whose log (default: the one tenant it is declared for)"
    )
    found.add_argument("--json", action="store_true", help="print one JSON object")
    found.set_defaults(run=cmd_interleaving)
