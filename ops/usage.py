"""``recmesh usage [--tenant T] [--json]``: what each tenant used and cost this hour.

Asks the quota service (``GetUsage``, the current hour's window): quota units granted and
calls denied, the recommendations whose cost was recorded, the candidates ranking scored
(by stage) and the CPU milliseconds retrieval and ranking spent (``docs/usage.md``). The
costs reach the quota service from the gateway about once a second
(``RECMESH_GATEWAY_USAGE_FLUSH_S``), so the last second may be missing. Exit status 1
when the quota service cannot be asked or does not know the tenant.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from ops.settings import OpsSettings

COLUMNS = (
    ("tenant", "tenant"),
    ("allowed", "units granted"),
    ("rejected", "denied"),
    ("costed_requests", "costed req"),
    ("candidates_scored", "scored"),
    ("retrieval_cpu_ms", "retrieval CPU ms"),
    ("ranking_cpu_ms", "ranking CPU ms"),
    ("cpu_ms_per_request", "CPU ms/req"),
)
"""The table's columns: the field of each row, its heading."""


def usage(settings: OpsSettings, tenant: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Every configured tenant's usage (or ``tenant``'s) as dicts: the ``TenantUsage``
    fields, zeros included, and ``cpu_ms_per_request``.

    Raises:
        grpc.RpcError: the quota service could not be reached, or refused (NOT_FOUND: no
            such tenant).
    """
    address = f"127.0.0.1:{settings.ports()['quota']}"
    transport = settings.transport()
    with transport.sync_channel(address, server="quota") as channel:
        reply = quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
            quota_pb2.GetUsageRequest(tenant=tenant), timeout=timeout_s
        )
    rows = []
    for entry in reply.usage:
        row = MessageToDict(
            entry, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        )
        for name in ("allowed", "rejected", "costed_requests", "candidates_scored"):
            row[name] = int(row[name])  # int64 is a string in proto JSON
        row["candidates_scored_by_stage"] = {
            stage: int(count) for stage, count in row["candidates_scored_by_stage"].items()
        }
        cpu_ms = entry.retrieval_cpu_ms + entry.ranking_cpu_ms
        row["cpu_ms_per_request"] = cpu_ms / entry.costed_requests if entry.costed_requests else 0.0
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], as_json: bool) -> str:
    """The rows as one JSON document (``--json``) or as a table with the stages below."""
    if as_json:
        return json.dumps({"window": "current hour", "usage": rows}, indent=2, sort_keys=True)
    cells = [[heading for _, heading in COLUMNS]]
    for row in rows:
        cells.append(
            [
                f"{row[name]:.1f}" if isinstance(row[name], float) else str(row[name])
                for name, _ in COLUMNS
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["usage in the current hour (costs flushed about once a second)"]
    for line in cells:
        lines.append(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
        )
    for row in rows:
        stages = row["candidates_scored_by_stage"]
        if stages:
            by_stage = ", ".join(f"{stage} {count}" for stage, count in sorted(stages.items()))
            lines.append(f"  {row['tenant']}: candidates scored by stage: {by_stage}")
    return "\n".join(lines)


def cmd_usage(args: argparse.Namespace, settings: OpsSettings) -> int:
    try:
        rows = usage(settings, args.tenant)
    except grpc.RpcError as exc:
        print(f"error: the quota service answered {exc.code().name}: {exc.details()}")
        return 1
    print(render(rows, args.json))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``usage`` to ``commands``."""
    parser = commands.add_parser(
        "usage",
        help="per tenant this hour: quota units, requests costed, candidates scored, CPU-ms",
    )
    parser.add_argument("--tenant", default="", help="one tenant (default: every tenant)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(run=cmd_usage)
