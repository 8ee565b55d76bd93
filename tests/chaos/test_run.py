"""The parts of the chaos driver that run without a mesh."""

from __future__ import annotations

import json
from pathlib import Path

from chaos.run import Tail


def test_tail_reads_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    tail = Tail(path)
    assert tail.read() == [], "no file yet"
    first = {"k": "rec", "t": 1.0, "ms": 5.0, "s": 200, "e": ""}
    second = {"k": "evt", "t": 2.0, "ms": 3.0, "s": 202, "e": "", "id": "é"}
    path.write_text(json.dumps(first) + "\n" + json.dumps(second)[:10])
    assert [r.t for r in tail.read()] == [1.0]
    path.write_text(json.dumps(first) + "\n" + json.dumps(second, ensure_ascii=False) + "\n")
    assert [(r.kind, r.event_id) for r in tail.read()] == [("rec", ""), ("evt", "é")]
    assert len(tail.read()) == 2, "nothing read twice"
