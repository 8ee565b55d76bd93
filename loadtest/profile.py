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
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from loadtest.harness import (
    QUIET_ENV,
    add_tracing_option,
    mesh_layout,
    prepare_artifacts,
    trace_receiver,
    write_tenants,
)
from loadtest.steps import STARTERS, Traffic, run_step, tenant_keys, warm_up
from loadtest.traffic import CLICK_SHARE, ZIPF_EXPONENT, write_tenant_keys
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
    step: object,
    profiles: Mapping[str, Path],
    top: int,
) -> str:
    """The Markdown report of one profiled step."""
    from loadtest.step_report import StepResult

    assert isinstance(step, StepResult)
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
        "| process | CPU s/s | CPU ms per recommendation |",
        "|---|---:|---:|",
    ]
    qps = max(step.achieved_qps, 1e-9)
    for name, cpu in sorted(step.cpu.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {cpu:.2f} | {1000 * cpu / qps:.2f} |")
    lines.append(f"| **total** | {step.target_cpu:.2f} | {1000 * step.target_cpu / qps:.2f} |")
    if step.load_cpu is not None:
        lines.append(f"| load generator | {step.load_cpu:.2f} | {1000 * step.load_cpu / qps:.2f} |")
    for name, path in profiles.items():
        if not path.exists():
            continue
        busy, own, inclusive = top_frames(path, top)
        lines += ["", f"## {name} ({busy} busy samples)", "", "| self | frame |", "|---:|---|"]
        lines += [f"| {100 * share:.1f} % | `{frame}` |" for frame, share in own]
        lines += ["", "| incl. | frame |", "|---:|---|"]
        lines += [f"| {100 * share:.1f} % | `{frame}` |" for frame, share in inclusive]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.profile", description=__doc__)
    parser.add_argument("--target", choices=sorted(STARTERS), default="mesh")
    parser.add_argument("--rate", type=float, default=50.0, help="offered recommendations/s")
    parser.add_argument("--step-s", type=float, default=20.0, help="profiled seconds")
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--artifacts", type=Path, help="artifact root to serve (default: train)")
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25, help="frames listed per process")
    parser.add_argument("--out", type=Path, help="default: docs/bench/profile-<target>.md")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    add_tracing_option(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one step and write the report; 0 on success."""
    args = parse_args(argv)
    words = list(argv) if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "-m", "loadtest.profile", *words])
    out = args.out or PROJECT_ROOT / "docs" / "bench" / f"profile-{args.target}.md"
    base = Path(tempfile.mkdtemp(prefix="recmesh-profile-"))
    try:
        artifacts = prepare_artifacts(args.artifacts, base, args.items, args.users)
        keys = tenant_keys()
        registry = write_tenants(base / "tenants.json", {k.name: k.api_key for k in keys})
        traffic = Traffic(
            artifacts=artifacts,
            tenant_keys=write_tenant_keys(base / "tenant-keys.json", keys),
            click_share=CLICK_SHARE,
            zipf=ZIPF_EXPONENT,
            seed=0,
        )
        with (
            trace_receiver(args.tracing) as (tracing, _),
            STARTERS[args.target](
                mesh_layout(base, artifacts, registry, {**QUIET_ENV, **tracing})
            ) as target,
        ):
            warm_up(target, args.rate, args.warmup_s, traffic, base)
            python = {name: pid for name, pid in target.pids.items() if name != "redis"}
            # The recording covers the step's window: locust takes a few seconds to open it.
            with recording(python, base, args.step_s + 8) as profiles:
                time.sleep(0.5)
                step = run_step(target, args.rate, args.step_s, traffic, base)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(report(command, args.target, args.rate, step, profiles, args.top))
    finally:
        if args.keep:
            print(f"run directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
