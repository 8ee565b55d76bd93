"""``python -m loadtest.bench``: per-stage latency of the funnel at a fixed rate.

The run trains a small artifact set (seeded, so every run serves the same models) unless
``--artifacts`` names one, starts its own mesh as processes (:mod:`loadtest.harness`: a
temporary var directory, free ports, its own Redis and tenant registry), and drives
it open-loop: request ``i`` of a phase is sent at ``start + i / rate`` whether or not the
earlier ones answered, so a slow mesh shows up as latency instead of a lower rate. Every
request asks for ``debug`` output, and the per-stage figures come from the stage reports
the services return (retrieval's and ranking's ``StageReport`` messages and the gateway's
``stage_ms``); end-to-end latency is measured by the client.

Phases (each after a warm-up that is not recorded):

* ``http``: ``POST /v1/recommend`` with the gateway's default deadline (100 ms);
* ``grpc-<D>ms`` for each ``--tight-deadlines-ms`` (15 and 30 by default): gRPC
  ``Recommend`` with that deadline, to show the funnel degrading instead of failing.

This module runs the phases; :mod:`loadtest.stage_report` computes their figures and
renders the report, which, with the command and the machine, goes to
``docs/bench/stages.md`` (``--out``; linked from ``docs/benchmarks.md``, which the step
benchmark ``python -m loadtest.steps`` writes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.harness import (
    QUIET_ENV,
    machine,
    mesh_layout,
    prepare_artifacts,
    running_mesh,
    write_tenants,
)
from loadtest.reporting import command_line
from loadtest.runs import add_run_options, describe_artifacts, run_directory
from loadtest.stage_report import (
    NUM_ITEMS,
    Phase,
    Sample,
    Summary,
    one_line,
    stage_figures,
    summarise,
    to_markdown,
)
from loadtest.traffic import n_users_of
from mesh.paths import PROJECT_ROOT
from mesh.tls import Transport
from ops import supervisor

TENANT = "bench"


async def drive(
    phase: Phase, send: Callable[[int], Awaitable[Sample]], max_in_flight: int = 512
) -> tuple[list[Sample], float]:
    """Send ``rate * duration_s`` requests open-loop; returns the samples and the wall time.

    A request that would exceed ``max_in_flight`` outstanding ones is recorded as
    ``SHED`` (client overload) rather than queued, so the schedule stays honest.
    """
    total = round(phase.rate * phase.duration_s)
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int) -> None:
        samples.append(await send(i))

    for i in range(total):
        delay = start + i / phase.rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            samples.append(Sample(ok=False, status="SHED", e2e_ms=0.0))
            continue
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return samples, loop.time() - start


def http_sender(url: str, api_key: str, n_users: int, seed: int) -> Any:
    """A ``send(i)`` for ``POST /v1/recommend`` and the session it needs (close it)."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=5)
    )
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, size=1_000_000)

    async def send(i: int) -> Sample:
        body = {"user_id": f"u{users[i % users.size]}", "num_items": NUM_ITEMS, "debug": True}
        started = time.perf_counter()
        try:
            async with session.post(
                url + "/v1/recommend", json=body, headers={"x-api-key": api_key}
            ) as response:
                payload = await response.json()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Sample(False, type(exc).__name__, (time.perf_counter() - started) * 1000)
        e2e = (time.perf_counter() - started) * 1000
        if status != 200:
            return Sample(False, str(status), e2e)
        sample = stage_figures(payload.get("stages", []), payload.get("stage_ms", {}))
        sample.e2e_ms = e2e
        sample.items = len(payload["items"])
        sample.degraded = list(payload["degraded"])
        return sample

    return send, session


def grpc_sender(
    port: int, api_key: str, n_users: int, seed: int, deadline_ms: float, transport: Transport
) -> Any:
    """A ``send(i)`` for gRPC ``Recommend`` with a deadline, and its channel (close it),
    over ``transport`` (the tools' identity, as the mesh requires)."""
    import grpc
    from google.protobuf.json_format import MessageToDict
    from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    channel = transport.channel(f"127.0.0.1:{port}", server="gateway")
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, size=1_000_000)

    async def send(i: int) -> Sample:
        request = gateway_pb2.RecommendRequest(
            user_id=f"u{users[i % users.size]}", num_items=NUM_ITEMS, debug=True
        )
        started = time.perf_counter()
        try:
            reply = await stub.Recommend(
                request, timeout=deadline_ms / 1000, metadata=(("x-api-key", api_key),)
            )
        except grpc.aio.AioRpcError as exc:
            return Sample(False, exc.code().name, (time.perf_counter() - started) * 1000)
        e2e = (time.perf_counter() - started) * 1000
        stages = [
            {**MessageToDict(s, preserving_proto_field_name=True), "stage": s.stage}
            for s in reply.stages
        ]
        sample = stage_figures(stages, dict(reply.stage_ms))
        sample.e2e_ms = e2e
        sample.items = len(reply.items)
        sample.degraded = list(reply.degraded)
        return sample

    return send, channel


async def run_phases(
    layout: supervisor.Layout,
    api_key: str,
    n_users: int,
    phases: Sequence[Phase],
    warmup_s: float,
    seed: int,
) -> list[Summary]:
    """Drive each phase in turn against the running mesh of ``layout`` (after ``warmup_s``
    unrecorded seconds at its rate), users ``u0`` .. ``u<n_users - 1>`` drawn uniformly
    with ``seed`` plus the phase's number; returns one summary per phase."""
    summaries = []
    for number, phase in enumerate(phases):
        if phase.api == "http":
            send, closer = http_sender(
                f"http://127.0.0.1:{layout.http_port}", api_key, n_users, seed + number
            )
        else:
            send, closer = grpc_sender(
                layout.ports["gateway"],
                api_key,
                n_users,
                seed + number,
                phase.deadline_ms or 100,
                layout.transport(),
            )
        try:
            if warmup_s > 0:
                await drive(dataclasses.replace(phase, duration_s=warmup_s), send)
            print(f"phase {phase.name}: {phase.rate:g}/s for {phase.duration_s:g} s", flush=True)
            samples, wall = await drive(phase, send)
        finally:
            await closer.close()
        summary = summarise(phase, samples, wall)
        print(f"  {one_line(summary)}", flush=True)
        summaries.append(summary)
    return summaries


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="unrecorded seconds per phase")
    parser.add_argument(
        "--tight-deadlines-ms",
        default="15,30",
        help="comma-separated deadlines of the gRPC phases (empty: none)",
    )
    add_run_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the user draw")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "stages.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the phases against a mesh of its own and write the report; 0 on success."""
    args = parse_args(argv)
    deadlines = [float(d) for d in args.tight_deadlines_ms.split(",") if d.strip()]
    phases = [Phase("http", "http", args.rate, args.duration)] + [
        Phase(f"grpc-{d:g}ms", "grpc", args.rate, args.duration, d) for d in deadlines
    ]
    command = command_line("loadtest.bench", argv if argv is not None else sys.argv[1:])
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with run_directory("recmesh-bench-", args.keep) as base:
        artifacts = prepare_artifacts(args.artifacts, base, args.items, args.users)
        n_users, _ = n_users_of(artifacts)
        api_key = "bench-" + secrets.token_hex(12)
        print(f"bench run in {base}; starting the mesh ...", flush=True)
        t_up = time.monotonic()
        tenants = write_tenants(base / "tenants.json", {TENANT: api_key})
        layout = mesh_layout(base, artifacts, tenants, QUIET_ENV)
        with running_mesh(layout):
            startup_s = time.monotonic() - t_up
            load_before = os.getloadavg()
            summaries = asyncio.run(
                run_phases(layout, api_key, n_users, phases, args.warmup, args.seed)
            )
            load_after = os.getloadavg()
        run = {
            "load": f"{load_before[0]:.2f} when the first phase started, {load_after[0]:.2f} "
            f"when the last ended (1-minute averages; the mesh itself adds about 1-2)",
            "started": started,
            "startup_s": startup_s,
            "warmup_s": args.warmup,
            "artifacts": describe_artifacts(artifacts, args.artifacts, categories=True),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(to_markdown(summaries, run, command, machine()))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
