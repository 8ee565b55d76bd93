"""``python -m loadtest.hop_cost``: what one hop costs as a unary call and through a pipe.

Starts the experiment service as a process (:func:`loadtest.tls_cost.experiment_process`,
mTLS on as in the mesh, or off with ``--plaintext``) and calls ``ExperimentService.Assign``
from this process the way a service calls its downstream: through
:class:`mesh.client.Downstream` (bulkhead, breaker, retry budget, span, deadline), once
opened for unary calls and once with ``pipe=True`` (:mod:`mesh.pipe`), inside a request
budget and naming a tenant. Calls are ``--gap-ms`` apart (a hop at a few hundred requests
per second: gRPC's poller and the event loops wake per call, which back-to-back calls
hide) or back to back with ``--gap-ms 0``. Prints the CPU per call of the client
(``process_time``) and of the server (``/proc``), and the wall time, the median of
``--rounds`` rounds, each measuring both ways back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from loadtest.tls_cost import Cost, experiment_process, measure, median_cost
from mesh.client import Downstream
from mesh.context import Budget, budget_var, tenant_var
from mesh.tls import Transport
from ops import certs

MODES = ("unary", "pipe")


async def run_rounds(
    tls: bool, tls_dir: Path, calls: int, gap_s: float, rounds: int
) -> dict[str, Cost]:
    """The median cost of one call per mode."""
    request = experiment_pb2.AssignRequest(user_id="u1")
    tenant_var.set("demo")
    samples: dict[str, list[Cost]] = {mode: [] for mode in MODES}
    with experiment_process(tls, tls_dir) as (pid, port):
        transport = Transport.load(tls, tls_dir, "gateway")
        downstreams = {
            mode: Downstream.open(
                "experiment",
                f"127.0.0.1:{port}",
                experiment_pb2_grpc.ExperimentServiceStub,
                transport=transport,
                pipe=mode == "pipe",
            )
            for mode in MODES
        }
        try:

            async def call(downstream: Downstream[Any]) -> object:
                budget_var.set(Budget(1.0))
                reply = await downstream.call(
                    downstream.stub.Assign, request, cap_s=0.5, idempotent=True
                )
                if gap_s:
                    await asyncio.sleep(gap_s)
                return reply

            for downstream in downstreams.values():
                await downstream.connect()
                await downstream.stub.Assign(request, timeout=10)  # opens the pipe's stream
                for _ in range(200):  # warm-up: connection, stream, the server's code paths
                    await call(downstream)
            for _ in range(rounds):
                for mode, downstream in downstreams.items():
                    one: Callable[[], Awaitable[object]] = functools.partial(call, downstream)
                    samples[mode].append(await measure(pid, calls, one))
        finally:
            for downstream in downstreams.values():
                await downstream.close()
    return {mode: median_cost(costs) for mode, costs in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.hop_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plaintext", action="store_true", help="TLS off on both sides")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        tls_dir = Path(directory)
        certs.ensure(tls_dir, ["experiment", "gateway", "ops"])
        medians = asyncio.run(
            run_rounds(not args.plaintext, tls_dir, args.calls, args.gap_ms / 1000, args.rounds)
        )
    print(
        f"{args.calls} Assign calls per round through mesh.client.Downstream, "
        f"{args.gap_ms:g} ms apart, {'plaintext' if args.plaintext else 'mTLS'}; "
        f"microseconds per call, the median of {args.rounds} rounds (both ways back to back "
        "in each). The wall time includes the gap."
    )
    print()
    print("| hop | client CPU | server CPU | both | wall |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        cost = medians[mode]
        print(
            f"| {mode} | {cost.client_us:.0f} | {cost.server_us:.0f} | "
            f"{cost.client_us + cost.server_us:.0f} | {cost.wall_us:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
