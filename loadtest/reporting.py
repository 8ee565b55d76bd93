"""What every benchmark's report shares: exact percentiles, millisecond cells, Markdown
tables and the "Run" section (command, date, machine, load, software, artifact set), and
the writing of a generated block into a hand-written Markdown file (:func:`write_block`).

Pure functions but :func:`write_block`; the benchmarks (:mod:`loadtest.stage_report`,
:mod:`loadtest.step_report`, :mod:`loadtest.profile`, :mod:`loadtest.experiment_stats`)
compose their reports from them.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ALIGN = {"l": "---", "r": "---:", "c": ":-:"}
"""Separator cell of a Markdown table column by alignment letter (left, right, centre)."""


def percentile(values: Sequence[float] | np.ndarray[Any, Any], q: float) -> float | None:
    """The exact ``q``-th percentile (numpy's linear interpolation) of ``values``, or
    ``None`` when there are none."""
    array = np.asarray(values, dtype=np.float64)
    return float(np.percentile(array, q)) if array.size else None


def ms(value: float | None, digits: int) -> str:
    """A latency cell: ``value`` with ``digits`` decimals, ``—`` when missing (None or NaN)."""
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(header: Sequence[str], align: str, rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table as lines: ``header``, the separator of ``align`` (one letter of
    :data:`ALIGN` per column), then one line per row (cells formatted with ``str``).

    Raises:
        ValueError: ``align`` does not have one letter per column of ``header``.
    """
    if len(align) != len(header):
        raise ValueError(f"{len(header)} columns but alignment {align!r}")
    lines = [_row(header), "|" + "".join(ALIGN[letter] + "|" for letter in align)]
    return lines + [_row(row) for row in rows]


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def command_line(module: str, argv: Sequence[str]) -> str:
    """The shell command that ran ``python -m module`` with ``argv`` (quoted as needed)."""
    return shlex.join(["python", "-m", module, *argv])


def run_section(
    command: str, started: str, box: Mapping[str, str], load: str, artifacts: str
) -> list[str]:
    """The "Run" section's heading, command and bullets: date ``started``, the machine
    ``box`` (:func:`loadtest.harness.machine`), the ``load`` bullet (its whole text, from
    "load average"), the software and the ``artifacts`` description. Callers add their
    own bullets after these."""
    return [
        "## Run",
        "",
        "```",
        command,
        "```",
        "",
        f"- date: {started}",
        f"- machine: {box['cpu']}, {box['memory']} RAM, {box['os']}",
        f"- {load}",
        f"- software: Python {box['python']}, {box['libraries']}; commit {box['commit']}",
        f"- artifact set: {artifacts}",
    ]


def write_block(path: Path, name: str, lines: Sequence[str]) -> None:
    """Put ``lines`` into the Markdown file ``path`` between the lines
    ``<!-- name: begin -->`` and ``<!-- name: end -->``, replacing what was between them and
    keeping the rest of the file (its prose, other benchmarks' blocks). When the file or the
    markers are missing, the block is appended at the end of the file (created if need be)."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if 0 <= start < stop:
        text = text[:start] + block + text[stop + len(end) :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
