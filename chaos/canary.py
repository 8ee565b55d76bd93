"""A scheduling canary: how late a 10-ms sleep wakes up on this host, second by second.

Run as its own small process (``python -m chaos.canary``) next to the mesh. When the
machine's CPUs are oversubscribed, every runnable process waits in the run queue, the
mesh's too; the canary's oversleep measures that wait. Each second becomes one line::

    {"t": 1700000000.0, "max_ms": 0.4, "mean_ms": 0.1}

``t`` is the wall-clock start of the second. It stops when ``--stop-file`` appears.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

NAP_S = 0.010


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.canary", description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--stop-file", required=True, type=Path)
    parser.add_argument("--duration", type=float, default=3600.0)
    args = parser.parse_args(argv)
    end = time.monotonic() + args.duration
    second = int(time.time())
    late: list[float] = []
    with args.out.open("a") as out:
        while time.monotonic() < end and not args.stop_file.exists():
            before = time.perf_counter()
            time.sleep(NAP_S)
            late.append(max(0.0, time.perf_counter() - before - NAP_S) * 1000.0)
            now = int(time.time())
            if now != second:
                record = {"t": second, "max_ms": round(max(late), 2)}
                record["mean_ms"] = round(sum(late) / len(late), 3)
                out.write(json.dumps(record) + "\n")
                out.flush()
                second, late = now, []
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
