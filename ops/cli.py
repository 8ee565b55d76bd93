"""The ``recmesh`` command: run, inspect and feed the mesh.

``recmesh up|down|status`` manage local processes; ``recmesh train`` builds a new
artifact set (``python -m training``; ``--from-log`` trains its ranker on a tenant's
event log, read from the mesh's Redis); ``recmesh versions`` lists the sets under the
artifact root, ``recmesh rollback [--to VERSION]`` moves ``current`` back (running
services pick it up without restart) and ``recmesh eval`` evaluates a set offline;
``recmesh ope --policy P`` estimates a candidate policy's CTR off-policy from a tenant's
log (``python -m training ope``, on the mesh's Redis); ``recmesh protos [--check]``
regenerates stubs; ``recmesh bench`` runs the step benchmark
(``python -m loadtest.steps``); ``recmesh chaos`` runs the chaos suite (``python -m chaos``);
``recmesh trace <request_id>`` prints a request's trace from Jaeger; ``recmesh explain
<request_id>`` why its answer showed what it showed, from the event log; ``recmesh events
tail`` the newest events of a tenant's log and ``recmesh events trim`` its retention;
``recmesh projections verify|rebuild|snapshot`` check, replay and snapshot the projector's
projections (:mod:`ops.projections`); ``recmesh features asof`` a user's features as of a
past time, from the event log (:mod:`ops.features_asof`); ``recmesh users erase`` erases a
user's events, projections and features, audited (:mod:`ops.users`); ``recmesh experiments
report <key>`` an experiment's report from the event log (:mod:`ops.experiments_report`)
and ``recmesh experiments interleaving <key>`` which arm of an interleaving experiment the
clicks prefer (:mod:`ops.experiments_interleaving`); ``recmesh keys add|revoke|list`` a
tenant's API keys in the tenant file (:mod:`ops.keys`); ``recmesh usage`` what each tenant
used and cost this hour (:mod:`ops.usage`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.artifacts import list_versions, load_artifact_set, resolve_current, rollback
from mesh.errors import ArtifactError, ConfigError
from mesh.paths import PROJECT_ROOT
from mesh.settings import load
from mesh.tls import Transport
from ops import (
    experiments_interleaving,
    experiments_report,
    keys,
    projections,
    protos,
    supervisor,
    usage,
    users,
)
from ops.settings import OpsSettings
from training.find import find_or_train

Command = Callable[[argparse.Namespace, OpsSettings], int]


def cmd_up(args: argparse.Namespace, settings: OpsSettings) -> int:
    layout = supervisor.Layout.from_settings(settings)
    started = time.monotonic()
    # The first run trains the default set (minutes); later runs reuse it.
    find_or_train(layout.artifacts, layout.artifacts)
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


def cmd_down(args: argparse.Namespace, settings: OpsSettings) -> int:
    stopped = supervisor.down(supervisor.Layout.from_settings(settings))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace, settings: OpsSettings) -> int:
    layout = supervisor.Layout.from_settings(settings)
    rows = supervisor.status(layout)
    print(f"{'process':<12}{'pid':>8}  {'port':>6}  health")
    for name, pid, health in rows:
        port = str(layout.ports.get(name, layout.redis_port if name == "redis" else "-"))
        print(f"{name:<12}{pid:>8}  {port:>6}  {health}")
    serving = all(h in ("SERVING", "running", "external") for _, _, h in rows)
    return 0 if serving else 1


def cmd_train(args: argparse.Namespace, settings: OpsSettings) -> int:
    rest = list(args.rest)
    if "--root" not in rest:
        rest = ["--root", str(settings.artifacts), *rest]
    if "--from-log" in rest and "--redis-url" not in rest:
        # The log is in the mesh's Redis: REDIS_URL, else the embedded one `up` starts.
        url = supervisor.Layout.from_settings(settings).effective_redis_url()
        rest = [*rest, "--redis-url", url]
    return subprocess.run([sys.executable, "-m", "training", "train", *rest]).returncode


def cmd_ope(args: argparse.Namespace, settings: OpsSettings) -> int:
    rest = list(args.rest)
    if "--root" not in rest:
        rest = ["--root", str(settings.artifacts), *rest]
    if "--redis-url" not in rest:
        # The log is in the mesh's Redis: REDIS_URL, else the embedded one `up` starts.
        url = supervisor.Layout.from_settings(settings).effective_redis_url()
        rest = [*rest, "--redis-url", url]
    return subprocess.run([sys.executable, "-m", "training", "ope", *rest]).returncode


def _artifact_root(args: argparse.Namespace, settings: OpsSettings) -> Path:
    root: Path | None = args.root
    return root if root is not None else settings.artifacts


def cmd_versions(args: argparse.Namespace, settings: OpsSettings) -> int:
    root = _artifact_root(args, settings)
    try:
        live = resolve_current(root).name
    except ArtifactError:
        live = ""
    versions = list_versions(root)
    if not versions:
        print(f"no artifact sets under {root}", file=sys.stderr)
        return 1
    print(f"artifact sets under {root} (* = current):")
    for version in versions:
        mark = "*" if version == live else " "
        try:
            manifest = load_artifact_set(root / version, verify=args.verify).manifest
        except ArtifactError as exc:
            print(f"{mark} {version}  BROKEN: {exc.message}")
            continue
        seeds = manifest["seeds"]
        recall = manifest["metrics"].get("retrieval.recall@100")
        print(
            f"{mark} {version}  seeds {seeds.get('data')}/{seeds.get('train')}  "
            f"recall@100 {'-' if recall is None else f'{recall:.3f}'}"
        )
    if args.root is None:
        ports = settings.ports()
        print("served now:")
        try:
            transport = settings.transport()
        except ConfigError:  # TLS on and no certificates: no mesh of ours can be running
            print("  unknown (no certificates issued: `recmesh up` or `recmesh certs`)")
            return 0
        for name in ("retrieval", "ranking"):
            print(f"  {name:<10}{_served_version(name, ports[name], transport)}")
    return 0


def _served_version(service: str, port: int, transport: Transport, timeout_s: float = 1.0) -> str:
    """The ``model_version`` a running retrieval or ranking answers with (one cheap request)."""
    import grpc
    from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc
    from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

    from mesh.context import TENANT_KEY

    metadata = ((TENANT_KEY, "demo"),)
    with transport.sync_channel(f"127.0.0.1:{port}", server=service) as channel:
        try:
            if service == "retrieval":
                reply: Any = retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
                    retrieval_pb2.RetrieveRequest(user_id="u0", ann_k=1, popular_k=1),
                    metadata=metadata,
                    timeout=timeout_s,
                )
            else:
                reply = ranking_pb2_grpc.RankingServiceStub(channel).Rank(
                    ranking_pb2.RankRequest(user_id="u0", num_items=1),
                    metadata=metadata,
                    timeout=timeout_s,
                )
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return str(reply.model_version)


def cmd_rollback(args: argparse.Namespace, settings: OpsSettings) -> int:
    root = _artifact_root(args, settings)
    try:
        before = resolve_current(root).name
        after = rollback(root, args.to).name
    except ArtifactError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"current: {before} -> {after}")
    print(
        "running retrieval and ranking swap to it within RECMESH_ARTIFACT_POLL_S "
        "(log event artifact_swapped)"
    )
    return 0


def cmd_eval(args: argparse.Namespace, settings: OpsSettings) -> int:
    root = _artifact_root(args, settings)
    command = [sys.executable, "-m", "training", "eval", "--root", str(root), *args.rest]
    return subprocess.run(command).returncode


def cmd_certs(args: argparse.Namespace, settings: OpsSettings) -> int:
    from ops import certs

    return certs.main(["--dir", str(settings.tls_dir), *(["--force"] if args.force else [])])


def cmd_protos(args: argparse.Namespace, settings: OpsSettings) -> int:
    return protos.main(check=args.check)


def cmd_bench(args: argparse.Namespace, settings: OpsSettings) -> int:
    # The load tests are files of the checkout (locust loads them by path), not an installed
    # package: run them from the project root.
    command = [sys.executable, "-m", "loadtest.steps", *args.rest]
    return subprocess.run(command, cwd=PROJECT_ROOT).returncode


def cmd_chaos(args: argparse.Namespace, settings: OpsSettings) -> int:
    # A tool above this one (it starts meshes through ops.supervisor): run it as a process.
    command = [sys.executable, "-m", "chaos", *args.rest]
    return subprocess.run(command, cwd=PROJECT_ROOT).returncode


def cmd_trace(args: argparse.Namespace, settings: OpsSettings) -> int:
    from ops import trace

    code, lines = trace.show(
        args.request_id,
        args.jaeger or settings.jaeger_url,
        supervisor.Layout.from_settings(settings).log_dir,
    )
    print("\n".join(lines))
    return code


def cmd_explain(args: argparse.Namespace, settings: OpsSettings) -> int:
    from mesh.tenants import load_tenants
    from ops import explain

    tenants = [args.tenant] if args.tenant else list(load_tenants(settings.tenants).tenants)
    address = f"127.0.0.1:{settings.ports()['events']}"
    code, text = explain.show(
        args.request_id, address, tenants, args.json, transport=settings.transport()
    )
    print(text)
    return code


def cmd_events_tail(args: argparse.Namespace, settings: OpsSettings) -> int:
    import grpc

    from ops import events_tail

    address = f"127.0.0.1:{settings.ports()['events']}"
    try:
        rows = events_tail.tail(
            events_tail.stored_events(address, args.tenant, transport=settings.transport()),
            args.limit,
            args.user,
            args.type,
        )
    except grpc.RpcError as exc:
        print(f"error: the events service at {address} answered {exc.code().name}")
        return 1
    print(events_tail.render(rows, args.json))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def cmd_features_asof(args: argparse.Namespace, settings: OpsSettings) -> int:
    from ops import features_asof

    address = f"127.0.0.1:{settings.ports()['feature']}"
    code, text = features_asof.show(
        address, args.tenant, args.user, args.at, args.json, transport=settings.transport()
    )
    print(text)
    return code


def _iso_time(text: str) -> int:
    from ops.features_asof import parse_time

    return parse_time(text)


def _forwarding(commands: Any, name: str, help_text: str, run: Command) -> argparse.ArgumentParser:
    """A subcommand that hands every argument after its name, untouched, to the tool it
    runs (which has its own ``--help``)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help_text, prefix_chars="+", add_help=False
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recmesh`` console script."""
    parser = argparse.ArgumentParser(prog="recmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start Redis and every service").set_defaults(run=cmd_up)
    commands.add_parser("down", help="stop what `up` started").set_defaults(run=cmd_down)
    commands.add_parser("status", help="health of every process").set_defaults(run=cmd_status)
    _forwarding(
        commands, "train", "train a new artifact set (python -m training train --help)", cmd_train
    )
    _forwarding(
        commands,
        "ope",
        "a candidate policy's CTR estimated off-policy from a tenant's log "
        "(python -m training ope --help)",
        cmd_ope,
    )
    versions = commands.add_parser("versions", help="artifact sets under the root, and current")
    versions.add_argument("--root", type=Path, help="artifact root (default: RECMESH_ARTIFACTS)")
    versions.add_argument(
        "--verify", action="store_true", help="check every file's sha256 (reads every set)"
    )
    versions.set_defaults(run=cmd_versions)
    back = commands.add_parser(
        "rollback", help="point current at the previous artifact set (or --to VERSION)"
    )
    back.add_argument("--to", metavar="VERSION", help="default: the version before current")
    back.add_argument("--root", type=Path, help="artifact root (default: RECMESH_ARTIFACTS)")
    back.set_defaults(run=cmd_rollback)
    _forwarding(
        commands,
        "eval",
        "offline evaluation of an artifact set (python -m training eval --help)",
        cmd_eval,
    ).set_defaults(root=None)
    gen = commands.add_parser("protos", help="generate stubs into gen/")
    gen.add_argument("--check", action="store_true", help="fail when gen/ is stale")
    gen.set_defaults(run=cmd_protos)
    _forwarding(
        commands,
        "bench",
        "throughput in steps of load, mesh against monolith (see --help)",
        cmd_bench,
    )
    _forwarding(commands, "chaos", "break the mesh under load and report (see --help)", cmd_chaos)
    events = commands.add_parser("events", help="read a tenant's event log").add_subparsers(
        dest="events_command", required=True
    )
    tail = events.add_parser("tail", help="the newest events of a tenant's log")
    tail.add_argument("--tenant", required=True)
    tail.add_argument("--user", default="", help="only this user's events")
    tail.add_argument("--type", default="", help="only events of this type (e.g. click)")
    tail.add_argument("--limit", type=_positive, default=20, help="how many (default 20)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.set_defaults(run=cmd_events_tail)
    projections.register(commands)
    projections.register_trim(events)
    users.register(commands)
    usage.register(commands)
    keys.register(commands)
    experiments_report.register(commands)
    experiments_interleaving.register(commands)
    features = commands.add_parser("features", help="a user's features").add_subparsers(
        dest="features_command", required=True
    )
    asof = features.add_parser("asof", help="a user's features as of a past time, from the log")
    asof.add_argument("--tenant", required=True)
    asof.add_argument("--user", required=True)
    asof.add_argument(
        "--at",
        required=True,
        type=_iso_time,
        help="ISO 8601 time, e.g. 2026-12-04T19:59:57Z (UTC when it has no offset)",
    )
    asof.add_argument("--json", action="store_true", help="print JSON")
    asof.set_defaults(run=cmd_features_asof)
    why = commands.add_parser("explain", help="why an answer showed its items, from the event log")
    why.add_argument("request_id", help="the request_id of a response")
    why.add_argument("--tenant", help="the tenant whose log to read (default: every tenant)")
    why.add_argument("--json", action="store_true", help="print JSON")
    why.set_defaults(run=cmd_explain)
    trace = commands.add_parser("trace", help="a request's trace from Jaeger, as a tree")
    trace.add_argument("request_id", help="the request_id of a response (or x-request-id sent)")
    trace.add_argument("--jaeger", help="Jaeger URL (default: RECMESH_JAEGER_URL or :16686)")
    trace.set_defaults(run=cmd_trace)
    certificates = commands.add_parser(
        "certs", help="issue the mesh's CA and identity certificates (keeps the good ones)"
    )
    certificates.add_argument("--force", action="store_true", help="issue all anew, CA too")
    certificates.set_defaults(run=cmd_certs)
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        return run(args, load(OpsSettings))
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
