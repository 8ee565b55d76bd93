"""``python -m loadtest.profile``: where a request's CPU goes, per process, under load.

Starts a target as the step benchmark does (:mod:`loadtest.harness`: the mesh, or the
monolith), warms it up, then offers one fixed rate with the HTTP locustfile
(:func:`loadtest.steps.run_step`) while ``py-spy record`` samples every Python process of
the target. The report gives, per process, the CPU it spent per recommendation (psutil,
over the step's window) and the functions the samples spent most time in, both as self
time and including callees, with idle samples (threads waiting in ``epoll`` or on a
queue) left out. py-spy's own sampling costs CPU on the machine under test, so latency
figures of a profiled run are worse than those of ``python -m loadtest.steps``; the CPU
shares stay comparable.

Output: ``docs/bench/profile-<target>.md`` (``--out``) and the raw collapsed stacks next
to it when ``--keep`` is given. py-spy must be installed (it is in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from loadtest.harness import add_tracing_option, prepare_artifacts, trace_receiver
from loadtest.reporting import command_line, table
from loadtest.runs import add_run_options, run_directory
from loadtest.step_report import StepResult
from loadtest.steps import STARTERS, run_step, set_up, tenant_keys, warm_up
from mesh.paths import PROJECT_ROOT

IDLE_FRAMES = ("select (selectors.py", "_worker (concurrent/futures", "wait (threading.py")
"""Innermost frames of a thread that is waiting, not working."""


def top_frames(
    collapsed: Path, count: int
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """``(busy samples, top self frames, top inclusive frames)`` of a py-spy raw file.

    Shares are of busy samples: stacks whose innermost frame is an idle wait
    (:data:`IDLE_FRAMES`) are left out.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in IDLE_FRAMES):
            continue
        n = int(samples)
        busy += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if busy == 0:
        return 0, [], []

    def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(frame, n / busy) for frame, n in counter.most_common(count)]

    return busy, shares(own), shares(inclusive)


@contextmanager
def recording(
    pids: Mapping[str, int], directory: Path, seconds: float
) -> Iterator[dict[str, Path]]:
    """``py-spy record`` of each pid for ``seconds`` (raw collapsed stacks), waited for on exit.

    Raises:
        RuntimeError: py-spy is not installed.
    """
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[dev]')")
    outputs = {name: directory / f"{name}.txt" for name in pids}
    processes = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(round(seconds)),
                "--rate",
                "100",
                "--format",
                "raw",
                "--output",
                str(outputs[name]),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield outputs
    finally:
        for process in processes:
            process.wait()


def report(
    command: str,
    target: str,
    rate: float,
    step: StepResult,
    profiles: Mapping[str, Path],
    top: int,
) -> str:
    """The Markdown report of one profiled step: its figures, each process's CPU per
    recommendation, and the ``top`` frames of each process's profile in ``profiles``
    (py-spy raw files; missing ones are left out)."""
    qps = max(step.achieved_qps, 1e-9)
    cpu_rows = [
        (name, f"{cpu:.2f}", f"{1000 * cpu / qps:.2f}")
        for name, cpu in sorted(step.cpu.items(), key=lambda kv: -kv[1])
    ]
    cpu_rows.append(("**total**", f"{step.target_cpu:.2f}", f"{1000 * step.target_cpu / qps:.2f}"))
    if step.load_cpu is not None:
        cpu_rows.append(
            ("load generator", f"{step.load_cpu:.2f}", f"{1000 * step.load_cpu / qps:.2f}")
        )
    lines = [
        f"# Profile of the {target} at {rate:g} recommendations/s",
        "",
        f"`{command}` ({datetime.now(UTC).isoformat(timespec='seconds')}). py-spy samples every",
        "process at 100 Hz without pausing it; its own CPU is on the same machine, so read the",
        "shares, not the latency.",
        "",
        f"- achieved {step.achieved_qps:.1f}/s, p50 {step.p50_ms or 0:.1f} ms, "
        f"p99 {step.p99_ms or 0:.1f} ms, errors {step.errors}, "
        f"degraded {100 * step.degraded_share:.1f} %",
        "",
        *table(("process", "CPU s/s", "CPU ms per recommendation"), "lrr", cpu_rows),
    ]
    for name, path in profiles.items():
        if not path.exists():
            continue
        busy, own, inclusive = top_frames(path, top)
        lines += ["", f"## {name} ({busy} busy samples)", ""]
        lines += table(("self", "frame"), "rl", _frame_rows(own))
        lines += ["", *table(("incl.", "frame"), "rl", _frame_rows(inclusive))]
    return "\n".join(lines) + "\n"


def _frame_rows(shares: Sequence[tuple[str, float]]) -> list[tuple[str, str]]:
    return [(f"{100 * share:.1f} %", f"`{frame}`") for frame, share in shares]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.profile", description=__doc__)
    parser.add_argument("--target", choices=sorted(STARTERS), default="mesh")
    parser.add_argument("--rate", type=float, default=50.0, help="offered recommendations/s")
    parser.add_argument("--step-s", type=float, default=20.0, help="profiled seconds")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    add_run_options(parser)
    parser.add_argument("--top", type=int, default=25, help="frames listed per process")
    parser.add_argument("--out", type=Path, help="default: docs/bench/profile-<target>.md")
    add_tracing_option(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one step and write the report; 0 on success."""
    args = parse_args(argv)
    command = command_line("loadtest.profile", list(argv) if argv is not None else sys.argv[1:])
    out = args.out or PROJECT_ROOT / "docs" / "bench" / f"profile-{args.target}.md"
    with run_directory("recmesh-profile-", args.keep) as base:
        artifacts = prepare_artifacts(args.artifacts, base, args.items, args.users)
        with trace_receiver(args.tracing) as (tracing, _):
            traffic, layout = set_up(base, artifacts, tenant_keys(), tracing)
            with STARTERS[args.target](layout) as target:
                warm_up(target, args.rate, args.warmup_s, traffic, base)
                python = {name: pid for name, pid in target.pids.items() if name != "redis"}
                # The recording covers the step's window: locust takes a few seconds to open it.
                with recording(python, base, args.step_s + 8) as profiles:
                    time.sleep(0.5)
                    step = run_step(target, args.rate, args.step_s, traffic, base)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(report(command, args.target, args.rate, step, profiles, args.top))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
