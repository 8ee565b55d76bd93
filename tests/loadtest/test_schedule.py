"""The pace of the load (users on interleaved fixed grids keep the arrival rate) and what
it records (JSON lines, error kinds)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from loadtest.traffic import Pacer, Recorder, error_kind
from mesh.testing import ManualClock


def simulate(
    users: int, period: float, latency_s: float, horizon_s: float, stall: tuple[int, float, float]
) -> list[float]:
    """Arrival times of ``users`` paced users, each visit taking ``latency_s``; user
    ``stall[0]`` has visits starting in ``[stall[1], stall[2])`` hang until ``stall[2]``."""
    arrivals: list[float] = []
    for number in range(users):
        clock = ManualClock(1000.0 + 0.01 * number)  # users start one by one
        pacer = Pacer(period, number, users, clock)
        clock.now += pacer.first_delay()
        while clock.now < 1000.0 + horizon_s:
            arrivals.append(clock.now)
            hung = number == stall[0] and stall[1] <= clock.now < stall[2]
            clock.now = stall[2] if hung else clock.now + latency_s
            clock.now += pacer.next_delay()
    return sorted(arrivals)


def test_interleaved_users_send_at_the_fixed_rate_evenly_spaced() -> None:
    arrivals = simulate(users=50, period=2.0, latency_s=0.03, horizon_s=60, stall=(-1, 0, 0))
    window = [t for t in arrivals if 1010.0 <= t < 1050.0]
    assert len(window) == pytest.approx(25 * 40, abs=1)
    gaps = [b - a for a, b in itertools.pairwise(window)]
    assert min(gaps) == pytest.approx(0.04, abs=1e-6) and max(gaps) == pytest.approx(0.04, abs=1e-6)


def test_a_stalled_user_catches_up_so_the_rate_holds() -> None:
    arrivals = simulate(users=10, period=2.0, latency_s=0.5, horizon_s=60, stall=(3, 1020, 1027))
    window = [t for t in arrivals if 1010.0 <= t < 1040.0]
    assert len(window) == pytest.approx(5 * 30, abs=1)
    during = [t for t in arrivals if 1020.5 <= t < 1027.0]
    assert len(during) < 5 * 6.5, "the stalled user sent nothing while it hung"


def test_visits_slower_than_the_period_run_back_to_back() -> None:
    clock = ManualClock(1000.0)
    pacer = Pacer(1.0, 0, 1, clock)
    clock.now += pacer.first_delay() + 3.0
    assert pacer.next_delay() == 0.0


def test_invalid_pace_is_refused() -> None:
    with pytest.raises(ValueError):
        Pacer(0.0, 0, 1)
    with pytest.raises(ValueError):
        Pacer(1.0, 0, 0)


def test_the_recorder_writes_json_lines_at_most_a_second_late(tmp_path: Path) -> None:
    clock = ManualClock(1000.0)
    path = tmp_path / "records.jsonl"
    recorder = Recorder(path, every_s=1.0, clock=clock)
    recorder.add({"k": "rec", "t": 1.0})
    assert not path.exists()
    clock.now += 1.0
    recorder.add({"k": "evt", "t": 2.0})
    recorder.add({"k": "rec", "t": 3.0})
    recorder.flush()
    assert [json.loads(line)["t"] for line in path.read_text().splitlines()] == [1.0, 2.0, 3.0]


class RetriesExceeded(Exception):
    """Stands in for geventhttpclient's error wrapping what happened to a POST."""

    def __init__(self, original: BaseException) -> None:
        super().__init__("retries exceeded")
        self.original = original


class EmptyResponse(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (None, 200, ""),
        (None, 503, "http"),
        (ConnectionRefusedError(), 0, "refused"),
        (TimeoutError(), 0, "timeout"),
        (ConnectionResetError(), 0, "reset"),
        (RetriesExceeded(TimeoutError()), 0, "timeout"),
        (RetriesExceeded(EmptyResponse()), 0, "reset"),
        (ValueError("odd"), 0, "other:ValueError"),
    ],
)
def test_errors_are_classified_by_what_happened(
    error: BaseException | None, status: int, kind: str
) -> None:
    assert error_kind(error, status) == kind
