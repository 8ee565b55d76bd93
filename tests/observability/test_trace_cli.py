"""``recmesh trace``: a request's trace from Jaeger's query API, or its log lines."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from ops import trace
from ops.cli import main

TRACE = {
    "traceID": "4bf92f3577b34da6a3ce929d0e0e4736",
    "processes": {"p1": {"serviceName": "gateway"}, "p2": {"serviceName": "ranking"}},
    "spans": [
        {
            "traceID": "4bf92f3577b34da6a3ce929d0e0e4736",
            "spanID": "a1",
            "operationName": "POST /v1/recommend",
            "references": [],
            "startTime": 1_000_000,
            "duration": 25_000,
            "processID": "p1",
            "tags": [
                {"key": "recmesh.request_id", "type": "string", "value": "req-1"},
                {"key": "recmesh.degraded", "type": "bool", "value": True},
            ],
        },
        {
            "traceID": "4bf92f3577b34da6a3ce929d0e0e4736",
            "spanID": "b2",
            "operationName": "recmesh.ranking.v1.RankingService/Rank",
            "references": [{"refType": "CHILD_OF", "traceID": "x", "spanID": "a1"}],
            "startTime": 1_005_000,
            "duration": 12_500,
            "processID": "p2",
            "tags": [{"key": "otel.status_code", "type": "string", "value": "ERROR"}],
        },
    ],
}


@pytest.fixture
def jaeger() -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    queries: list[dict[str, list[str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlparse(self.path).query)
            queries.append(query)
            tags = json.loads(query["tags"][0])
            data: list[Any] = [TRACE] if tags.get("recmesh.request_id") == "req-1" else []
            body = json.dumps({"data": data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", queries
    server.shutdown()
    server.server_close()


def test_prints_the_link_and_the_span_tree(
    jaeger: tuple[str, list[dict[str, list[str]]]], tmp_path: Path
) -> None:
    url, queries = jaeger
    code, lines = trace.show("req-1", url, tmp_path)
    assert code == 0
    assert queries[0]["service"] == ["gateway"]
    assert lines[0] == f"trace {TRACE['traceID']}: {url}/trace/{TRACE['traceID']}"
    assert "gateway: POST /v1/recommend  [degraded=True]" in lines[1]
    assert lines[2].endswith("  ranking: recmesh.ranking.v1.RankingService/Rank  ERROR")
    assert "12.50 ms" in lines[2] and "5.0 ms" in lines[2]


def test_falls_back_to_log_lines(
    jaeger: tuple[str, list[dict[str, list[str]]]], tmp_path: Path
) -> None:
    url, _ = jaeger
    line = json.dumps({"msg": "rpc", "request_id": "req-2", "trace_id": "ab" * 16})
    (tmp_path / "ranking.log").write_text(line + "\n" + json.dumps({"msg": "other"}) + "\n")
    code, lines = trace.show("req-2", url, tmp_path)
    assert code == 0
    assert lines[0].startswith("No trace for request req-2")
    assert lines[-1] == f"ranking: {line}"
    assert trace.show("req-3", url, tmp_path)[0] == 1


def test_cli_subcommand(
    jaeger: tuple[str, list[dict[str, list[str]]]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = jaeger
    assert main(["trace", "req-1", "--jaeger", url]) == 0
    assert f"{url}/trace/{TRACE['traceID']}" in capsys.readouterr().out
