"""The ``recmesh`` command: run, inspect and feed the mesh.

``recmesh up|down|status`` manage local processes; ``recmesh train`` builds a new
artifact set (``python -m training``); ``recmesh protos [--check]`` regenerates stubs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from mesh.errors import ArtifactError
from ops import protos, supervisor
from training.artifacts import resolve_current


def _ensure_artifacts(layout: supervisor.Layout) -> None:
    try:
        resolve_current(layout.artifacts)
        return
    except ArtifactError:
        print(f"no artifact set under {layout.artifacts}; training one (first run only)")
    subprocess.run(
        [sys.executable, "-m", "training", "train", "--root", str(layout.artifacts)], check=True
    )


def cmd_up(args: argparse.Namespace) -> int:
    layout = supervisor.Layout.from_env()
    started = time.monotonic()
    _ensure_artifacts(layout)
    print("starting the mesh ...")
    supervisor.up(layout)
    print(f"mesh is SERVING ({time.monotonic() - started:.1f} s)")
    http = f"http://127.0.0.1:{layout.http_port}"
    print(f"  HTTP API : {http}   (OpenAPI: {http}/openapi.json, health: {http}/healthz)")
    print(f"  gRPC API : 127.0.0.1:{layout.ports['gateway']}  (recmesh.gateway.v1.GatewayService)")
    print(f"  logs     : {layout.log_dir}")
    print("try:")
    print(
        f'  curl -s -H \'x-api-key: demo-key\' -d \'{{"user_id":"u1","num_items":10}}\' '
        f"{http}/v1/recommend"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = supervisor.down(supervisor.Layout.from_env())
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    layout = supervisor.Layout.from_env()
    rows = supervisor.status(layout)
    print(f"{'process':<12}{'pid':>8}  {'port':>6}  health")
    for name, pid, health in rows:
        port = str(layout.ports.get(name, layout.redis_port if name == "redis" else "-"))
        print(f"{name:<12}{pid:>8}  {port:>6}  {health}")
    serving = all(h in ("SERVING", "running", "external") for _, _, h in rows)
    return 0 if serving else 1


def cmd_train(args: argparse.Namespace) -> int:
    return subprocess.run([sys.executable, "-m", "training", "train", *args.rest]).returncode


def cmd_protos(args: argparse.Namespace) -> int:
    return protos.main(check=args.check)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recmesh`` console script."""
    parser = argparse.ArgumentParser(prog="recmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start Redis and every service").set_defaults(run=cmd_up)
    commands.add_parser("down", help="stop what `up` started").set_defaults(run=cmd_down)
    commands.add_parser("status", help="health of every process").set_defaults(run=cmd_status)
    train = commands.add_parser("train", help="train a new artifact set (see --help)")
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(run=cmd_train)
    gen = commands.add_parser("protos", help="generate stubs into gen/")
    gen.add_argument("--check", action="store_true", help="fail when gen/ is stale")
    gen.set_defaults(run=cmd_protos)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
