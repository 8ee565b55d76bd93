"""Writing the fault flags file: what :func:`mesh.faults.write_flags` writes, every
:class:`mesh.faults.FaultInjector` reads back, and a bad flag never reaches the file."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from mesh.faults import Fault, FaultInjector, write_flags


def test_written_flags_are_read_back_by_the_injector(tmp_path: Path) -> None:
    path = tmp_path / "var" / "faults.json"
    write_flags(
        path,
        {
            "ranking": {"Rank": {"error_rate": 0.5, "code": "UNAVAILABLE"}},
            "retrieval": {"*": {"latency_ms": 200}},
        },
    )
    ranking = FaultInjector("ranking", path)
    ranking.reload()
    assert ranking.faults == {"Rank": Fault(0.5, grpc.StatusCode.UNAVAILABLE)}
    retrieval = FaultInjector("retrieval", path)
    retrieval.reload()
    assert retrieval.active("Retrieve") == ("*", Fault(latency_ms=200.0))

    write_flags(path, {})
    ranking.reload()
    assert ranking.faults == {}, "empty flags clear every fault"
    assert [p.name for p in path.parent.iterdir()] == ["faults.json"], "no scratch file left"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"ranking": {"Rank": {"error_rate": 1.5}}}, r"ranking\.Rank: error_rate"),
        ({"ranking": {"Rank": {"code": "NOT_A_CODE"}}}, "unknown status code"),
        ({"ranking": {"Rank": {"latency": 5}}}, "expected an object"),
        ({"ranking": ["Rank"]}, "ranking: expected an object of methods"),
    ],
)
def test_a_bad_flag_is_refused_and_the_file_kept(
    tmp_path: Path, flags: dict[str, object], message: str
) -> None:
    path = tmp_path / "faults.json"
    write_flags(path, {"feature": {"*": {"hang": True}}})
    before = path.read_text()
    with pytest.raises(ValueError, match=message):
        write_flags(path, flags)  # type: ignore[arg-type]
    assert path.read_text() == before
