"""``recmesh trace <request_id>``: the trace of one request, from Jaeger, as a tree.

Every span of a request carries ``recmesh.request_id``; Jaeger's query API finds the trace
by that tag on the gateway's spans. The command prints the Jaeger link and the span tree
(service, operation, duration, the ``recmesh.*`` attributes, errors). When Jaeger has no
such trace (the request was not sampled, or the collector's tail sampling dropped it), it
prints the request's log lines from the local mesh instead: they carry the trace id too.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def find_traces(
    base_url: str, request_id: str, lookback: str = "2h", timeout_s: float = 5.0
) -> list[dict[str, Any]]:
    """Traces whose gateway spans carry ``recmesh.request_id = request_id``.

    Raises:
        OSError: Jaeger cannot be reached.
    """
    query = urllib.parse.urlencode(
        {
            "service": "gateway",
            "tags": json.dumps({"recmesh.request_id": request_id}),
            "lookback": lookback,
            "limit": 5,
        }
    )
    with urllib.request.urlopen(f"{base_url}/api/traces?{query}", timeout=timeout_s) as reply:
        traces: list[dict[str, Any]] = json.loads(reply.read()).get("data") or []
    return traces


def _tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def render(trace: dict[str, Any]) -> list[str]:
    """One line per span, children indented under their parent, in start order."""
    spans = {span["spanID"]: span for span in trace["spans"]}
    processes = trace.get("processes", {})
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for span in spans.values():
        parents = [
            ref["spanID"]
            for ref in span.get("references", [])
            if ref.get("refType") == "CHILD_OF" and ref["spanID"] in spans
        ]
        if parents:
            children.setdefault(parents[0], []).append(span)
        else:
            roots.append(span)
    start = min(span["startTime"] for span in spans.values())
    lines: list[str] = []

    def walk(items: Iterable[dict[str, Any]], depth: int) -> None:
        for span in sorted(items, key=lambda s: s["startTime"]):
            tags = _tags(span)
            service = processes.get(span.get("processID", ""), {}).get("serviceName", "?")
            error = tags.get("error") is True or tags.get("otel.status_code") == "ERROR"
            shown = {
                k.removeprefix("recmesh."): v
                for k, v in tags.items()
                if k.startswith("recmesh.") and k not in ("recmesh.request_id", "recmesh.tenant")
            }
            extra = " ".join(f"{k}={v}" for k, v in sorted(shown.items()))
            lines.append(
                f"{(span['startTime'] - start) / 1000:8.1f} ms {span['duration'] / 1000:8.2f} ms  "
                f"{'  ' * depth}{service}: {span['operationName']}"
                + ("  ERROR" if error else "")
                + (f"  [{extra}]" if extra else "")
            )
            walk(children.get(span["spanID"], []), depth + 1)

    walk(roots, 0)
    return lines


def log_lines(log_dir: Path, request_id: str) -> list[str]:
    """Lines of the mesh's logs that name ``request_id`` (JSON logs, ``request_id`` field)."""
    needle = f'"request_id": "{request_id}"'
    found = []
    for path in sorted(log_dir.glob("*.log")):
        with path.open(errors="replace") as log:
            found += [f"{path.stem}: {line.rstrip()}" for line in log if needle in line]
    return found


def show(request_id: str, base_url: str, log_dir: Path) -> tuple[int, list[str]]:
    """Exit code and lines of ``recmesh trace``: the traces that Jaeger's query service at
    ``base_url`` (``OpsSettings.jaeger_url``) holds for ``request_id``, else the request's
    lines in the logs under ``log_dir``."""
    base_url = base_url.rstrip("/")
    try:
        traces = find_traces(base_url, request_id)
    except (OSError, urllib.error.URLError) as exc:
        traces = []
        out = [f"Jaeger at {base_url} is not reachable ({exc})."]
    else:
        out = []
    for trace in traces:
        out.append(f"trace {trace['traceID']}: {base_url}/trace/{trace['traceID']}")
        out += render(trace)
    if traces:
        return 0, out
    if not out:
        out.append(
            f"No trace for request {request_id} in Jaeger at {base_url}: not sampled, dropped "
            "by the collector's tail sampling, or older than the lookback."
        )
    lines = log_lines(log_dir, request_id)
    if lines:
        out.append(f"Log lines of request {request_id} under {log_dir}:")
        out += lines
    return (0 if lines else 1), out
