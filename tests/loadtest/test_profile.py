"""The profile report ranks where busy samples went, idle waits left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.profile import top_frames


def test_top_frames_rank_self_and_inclusive_time_of_busy_samples(tmp_path: Path) -> None:
    raw = tmp_path / "gateway.txt"
    raw.write_text(
        "main (a.py:1);handle (b.py:2);encode (c.py:3) 30\n"
        "main (a.py:1);handle (b.py:2) 10\n"
        "main (a.py:1);score (d.py:4) 60\n"
        "main (a.py:1);EpollSelector.select (selectors.py:468) 500\n"
    )
    busy, own, inclusive = top_frames(raw, 3)
    assert busy == 100
    assert own == [("score (d.py:4)", 0.6), ("encode (c.py:3)", 0.3), ("handle (b.py:2)", 0.1)]
    assert inclusive[0] == ("main (a.py:1)", 1.0)
    assert dict(inclusive)["handle (b.py:2)"] == pytest.approx(0.4)


def test_an_idle_process_has_no_busy_samples(tmp_path: Path) -> None:
    raw = tmp_path / "quota.txt"
    raw.write_text("main (a.py:1);EpollSelector.select (selectors.py:468) 50\n")
    assert top_frames(raw, 5) == (0, [], [])
