"""``recmesh users erase --tenant T --user U [--by NAME] [--json]``: erase a user.

Asks the events service (``EraseUser``), which owns the log: it removes the user's events,
dead letters, projections and features, recomputes the counters of the items their events
touched, and appends an audit record to the tenant's audit stream (who: ``--by``, by
default the OS user running the command; the user as ``sha256:<hex>``; the counts).
Erasing is idempotent; a user with nothing stored is erased with zero counts, and audited.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.events import ERASURE_COUNTS as COUNTS
from mesh.context import TENANT_KEY
from mesh.tls import PLAINTEXT, Transport
from ops.settings import OpsSettings


def erase(
    address: str,
    tenant: str,
    user_id: str,
    requested_by: str,
    timeout_s: float = 600.0,
    *,
    transport: Transport = PLAINTEXT,
) -> dict[str, Any]:
    """Erase ``user_id`` from ``tenant`` through the events service at ``address``; returns
    the answer as a dict (every count, zeros included).

    Raises:
        grpc.RpcError: the events service refused (INVALID_ARGUMENT: a bad user id) or
            could not be reached.
    """
    with transport.sync_channel(address, server="events") as channel:
        reply = events_pb2_grpc.EventServiceStub(channel).EraseUser(
            events_pb2.EraseUserRequest(user_id=user_id, requested_by=requested_by),
            metadata=((TENANT_KEY, tenant),),
            timeout=timeout_s,
        )
    return MessageToDict(
        reply, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


def render(tenant: str, erased: dict[str, Any], as_json: bool) -> str:
    """The answer as one JSON object (``--json``) or as lines for a terminal."""
    if as_json:
        return json.dumps({"tenant": tenant, **erased}, sort_keys=True)
    lines = [
        f"erased {erased['subject']} from tenant {tenant} (audit record {erased['audit_position']})"
    ]
    lines += [f"  {name.replace('_', ' '):<17}{erased[name]:>8}" for name in COUNTS]
    return "\n".join(lines)


def cmd_erase(args: argparse.Namespace, settings: OpsSettings) -> int:
    address = f"127.0.0.1:{settings.ports()['events']}"
    try:
        erased = erase(
            address,
            args.tenant,
            args.user,
            args.by or getpass.getuser(),
            args.timeout,
            transport=settings.transport(),
        )
    except grpc.RpcError as exc:
        print(f"error: the events service at {address} answered {exc.code().name}: {exc.details()}")
        return 1
    print(render(args.tenant, erased, args.json))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``users erase`` to ``commands``."""
    users = commands.add_parser("users", help="a tenant's users").add_subparsers(
        dest="users_command", required=True
    )
    erase_cmd = users.add_parser(
        "erase", help="remove a user's events, projections and features; audited"
    )
    erase_cmd.add_argument("--tenant", required=True)
    erase_cmd.add_argument("--user", required=True, help="the user id to erase")
    erase_cmd.add_argument(
        "--by", default="", help="who erases, for the audit record (default: the OS user)"
    )
    erase_cmd.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the answer"
    )
    erase_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    erase_cmd.set_defaults(run=cmd_erase)
