"""Command line: ``python -m training train|eval|rollback|simulate-serve``.

``train`` runs :func:`training.pipeline.train` and prints a summary (version, wall time
per phase, metrics). ``train --from-log [--tenant T] [--redis-url URL] [--base V]`` runs
:func:`training.from_log.train_from_log` instead: a new set, the base set (``current``,
or ``--base``) with a ranker learnt from the tenant's event log; the world's options
(``--items`` ...) do not apply to it, and a log with too few impressions or no click is
refused (status 1). ``simulate-serve`` appends a simulated serve of a set to a tenant's
log through the events service (:mod:`training.simulate`). ``ope --policy P`` estimates a
candidate policy's CTR off-policy from a tenant's log (:mod:`training.ope`: a final stage
over the logged supports of the mesh's answers, or a simulated serve for a simulated log;
status 1 when the log cannot be read, has fewer than two answers, or logs propensities of 1
without supports, which are conditional on candidates the log does not hold). ``eval``
recomputes the metrics of an existing set (``current``, or ``--version V``) from its
files, on the world regenerated from its manifest, and prints them next to the stored
ones (``!`` marks a difference; ``--check`` exits 2 if any). ``rollback`` moves
``current`` to the previous version, or to ``--to VERSION``. Artifact problems exit with
status 1 and the error on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
import redis

from core.artifacts import load_artifact_set, resolve_current, rollback
from mesh import redis as mesh_redis
from mesh.errors import ArtifactError, ConfigError, FailedPrecondition
from mesh.settings import ToolTlsSettings, load
from mesh.tls import Transport


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_cmd = commands.add_parser("train", help="build and publish a new artifact set")
    train_cmd.add_argument("--root", type=Path, default=Path("artifacts"))
    train_cmd.add_argument("--items", type=int, default=20000)
    train_cmd.add_argument("--users", type=int, default=5000)
    train_cmd.add_argument("--categories", type=int, default=50)
    train_cmd.add_argument("--data-seed", type=int, default=0)
    train_cmd.add_argument("--train-seed", type=int, default=0)
    train_cmd.add_argument(
        "--epochs", type=int, default=None, help="override every model's epochs (default: tuned)"
    )
    train_cmd.add_argument("--eval-users", type=int, default=2000)
    train_cmd.add_argument("--no-eval", action="store_true", help="skip offline evaluation")
    train_cmd.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train_cmd.add_argument(
        "--mtl-report",
        action="store_true",
        help="also measure the ranker's multi-task and unbiased-learning diagnostics "
        "(manifest config.mtl_report, printed)",
    )
    log_opts = train_cmd.add_argument_group("training the ranker from the event log")
    log_opts.add_argument(
        "--from-log", action="store_true", help="train the ranker on a tenant's logged impressions"
    )
    log_opts.add_argument("--tenant", default="demo", help="whose log (default: demo)")
    log_opts.add_argument(
        "--promote-if-worse",
        action="store_true",
        help="serve the new set even if its held-out click AUC is below the base ranker's",
    )
    log_opts.add_argument("--redis-url", help="Redis holding the log (default: REDIS_URL)")
    log_opts.add_argument(
        "--base",
        metavar="V",
        help="base set: a version under --root or a set's directory (default: current)",
    )
    log_opts.add_argument(
        "--heldout-share", type=float, default=0.2, help="latest share of impressions held out"
    )
    log_opts.add_argument(
        "--min-impressions", type=int, default=1000, help="refuse a log with fewer (default 1000)"
    )
    log_opts.add_argument(
        "--ipw-clip",
        type=float,
        default=None,
        help="weight impressions by inverse logged propensity, clipped at this multiple of "
        "the mean weight, self-normalised (default: unweighted; 10 is the measured setting)",
    )

    sim_cmd = commands.add_parser(
        "simulate-serve", help="append a simulated serve of an artifact set to a tenant's log"
    )
    sim_cmd.add_argument("--root", type=Path, default=Path("artifacts"))
    sim_cmd.add_argument("--version", metavar="V", help="default: the current version")
    sim_cmd.add_argument("--tenant", default="demo")
    sim_cmd.add_argument(
        "--events", metavar="HOST:PORT", help="events service (default: this host's port)"
    )
    sim_cmd.add_argument("--requests", type=int, default=20000)
    sim_cmd.add_argument("--slate", type=int, default=10)
    sim_cmd.add_argument("--explore-slots", type=int, default=1)
    sim_cmd.add_argument(
        "--explore-pool",
        type=int,
        default=0,
        help="0: explore the whole catalogue, log marginal propensities; N > 0: the mesh's "
        "way, explore the N candidates after the ranked ones, log supports",
    )
    sim_cmd.add_argument("--seed", type=int, default=0)

    ope_cmd = commands.add_parser(
        "ope", help="estimate a candidate policy's CTR off-policy from a tenant's log"
    )
    ope_cmd.add_argument(
        "--policy",
        required=True,
        metavar="SET|JSON",
        help="an artifact set (a version under --root or a directory), or a JSON file of "
        "parameters: for the mesh's logs artifacts, order, head_weights, slate, "
        "explore_share, explore_pool; for a simulated log artifacts, candidates, slate, "
        "explore_slots, head_weights",
    )
    ope_cmd.add_argument("--root", type=Path, default=Path("artifacts"))
    ope_cmd.add_argument("--tenant", default="demo", help="whose log (default: demo)")
    ope_cmd.add_argument("--redis-url", help="Redis holding the log (default: REDIS_URL)")
    ope_cmd.add_argument(
        "--clip", type=float, default=None, help="cap of an importance weight (default 100)"
    )
    ope_cmd.add_argument(
        "--truth",
        action="store_true",
        help="also print the candidate's true CTR from its set's world (for a simulated log)",
    )
    ope_cmd.add_argument("--json", action="store_true", help="print one JSON object")

    eval_cmd = commands.add_parser("eval", help="recompute the metrics of an artifact set")
    eval_cmd.add_argument("--root", type=Path, default=Path("artifacts"))
    eval_cmd.add_argument("--version", metavar="V", help="default: the current version")
    eval_cmd.add_argument(
        "--check", action="store_true", help="exit 2 if a metric differs from the stored one"
    )

    rollback_cmd = commands.add_parser("rollback", help="move current to an older version")
    rollback_cmd.add_argument("--root", type=Path, default=Path("artifacts"))
    rollback_cmd.add_argument("--to", metavar="VERSION", help="default: the previous version")

    args = parser.parse_args(argv)
    if args.command == "train" and args.from_log:
        world_options = ("items", "users", "categories", "data_seed", "eval_users")
        given = [o for o in world_options if getattr(args, o) != train_cmd.get_default(o)]
        if given:
            parser.error(f"--from-log keeps the base set's world: drop --{given[0]}")
    try:
        if args.command == "train":
            return _train_from_log(args) if args.from_log else _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "simulate-serve":
            return _simulate(args)
        if args.command == "ope":
            return _ope(args)
        before = resolve_current(args.root).name
        after = rollback(args.root, args.to).name
        print(f"current: {before} -> {after}")
        return 0
    except (ArtifactError, FailedPrecondition, ConfigError) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def _train(args: argparse.Namespace) -> int:
    # Imported here so that `rollback` does not pay for importing torch.
    from training.evaluate import format_metrics
    from training.pipeline import PHASES, TrainConfig, train

    config = TrainConfig(
        n_users=args.users,
        n_items=args.items,
        n_categories=args.categories,
        data_seed=args.data_seed,
        train_seed=args.train_seed,
        epochs=args.epochs,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        eval_users=args.eval_users,
        mtl_report=args.mtl_report,
    )
    path = train(args.root, config)
    artifact_set = load_artifact_set(path, verify=False)
    timings = artifact_set.manifest["timings_s"]
    live = resolve_current(args.root).name == path.name
    served = f"-> {path.name}" if live else "unchanged: its held-out click AUC is below the base's"
    print(f"\nversion  {artifact_set.version}\npath     {path}\ncurrent  {served}")
    phases = [*PHASES, "mtl_report", "total"]
    print("wall time (s): " + ", ".join(f"{p} {timings[p]:.1f}" for p in phases if p in timings))
    print(format_metrics(artifact_set.metrics))
    if "mtl_report" in artifact_set.config:
        import json

        print("multi-task report (manifest config.mtl_report):")
        print(json.dumps(artifact_set.config["mtl_report"], indent=1))
    return 0


def _train_from_log(args: argparse.Namespace) -> int:
    from training.evaluate import format_metrics
    from training.from_log import FromLogConfig, LogSettings, train_from_log
    from training.log_data import LABELS

    settings = load(LogSettings)
    url = args.redis_url or settings.redis_url
    if not url:
        raise ConfigError("--from-log reads the log from Redis: give --redis-url or REDIS_URL")
    if args.base:
        base_path = Path(args.base) if Path(args.base).is_dir() else args.root / args.base
    else:
        base_path = resolve_current(args.root)
    base = load_artifact_set(base_path, verify=True)
    config = FromLogConfig(
        tenant=args.tenant,
        history_cap=settings.history_cap,
        heldout_share=args.heldout_share,
        min_impressions=args.min_impressions,
        train_seed=args.train_seed,
        epochs=args.epochs,
        evaluate_world=not args.no_eval,
        progress=not args.no_progress,
        promote_if_worse=args.promote_if_worse,
        ipw_clip=args.ipw_clip,
    )
    client = mesh_redis.blocking_client(url, socket_timeout=30.0, socket_connect_timeout=2.0)
    try:
        path = train_from_log(args.root, base, client, config)
    except redis.RedisError as exc:
        raise ConfigError(f"cannot read the log of {args.tenant!r} at {url}: {exc}") from exc
    finally:
        client.close()
    artifact_set = load_artifact_set(path, verify=False)
    lineage = artifact_set.config["from_log"]
    timings = artifact_set.manifest["timings_s"]
    live = resolve_current(args.root).name == path.name
    served = f"-> {path.name}" if live else "unchanged: its held-out click AUC is below the base's"
    print(f"\nversion  {artifact_set.version}\npath     {path}\ncurrent  {served}")
    print(
        f"from the log of {lineage['tenant']!r}, positions {lineage['first_position']} .. "
        f"{lineage['last_position']} ({lineage['entries']} entries), on {base.version}"
    )
    examples, positives = lineage["examples"], lineage["positives"]
    for part in ("train", "heldout"):
        labelled = ", ".join(f"{positives[part][h]} {h}s" for h in LABELS)
        print(f"  {part:<8} {examples[part]} impressions, {labelled}")
    print(
        f"  skipped  {lineage['unknown_items']} impressions of items outside the set; "
        f"{lineage['unknown_users']} examples of unknown users (default row)"
    )
    print("wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(format_metrics(artifact_set.metrics))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from training.from_log import LogSettings
    from training.pipeline import world_of
    from training.simulate import ServeConfig, append_events, simulate_serve

    path = args.root / args.version if args.version else resolve_current(args.root)
    artifact_set = load_artifact_set(path, verify=False)
    address = args.events or f"127.0.0.1:{load(LogSettings).events_port}"
    try:
        config = ServeConfig(
            requests=args.requests,
            slate=args.slate,
            explore_slots=args.explore_slots,
            explore_pool=args.explore_pool,
            seed=args.seed,
        )
    except ValueError as exc:
        raise ConfigError(f"simulate-serve: {exc}") from exc
    world, _ = world_of(artifact_set)
    span_ms = config.requests * config.gap_ms + config.click_delay_ms[1] * 2
    events = simulate_serve(artifact_set, world, config, int(time.time() * 1000) - span_ms)
    try:
        transport = Transport.for_tool(load(ToolTlsSettings))
        appended, duplicates = append_events(address, args.tenant, events, transport=transport)
    except grpc.RpcError as exc:
        print(f"error: the events service at {address}: {exc}", file=sys.stderr)
        return 1
    kinds = [e.type for e in events]
    print(
        f"{args.tenant}: {appended} events appended ({duplicates} already there): "
        f"{kinds.count('impression')} impressions, {kinds.count('click')} clicks, "
        f"{kinds.count('conversion')} conversions, from {artifact_set.version}"
    )
    return 0


def _ope(args: argparse.Namespace) -> int:
    import json

    from core.experiments.ope import DEFAULT_CLIP
    from training.from_log import LogSettings
    from training.log_data import read_examples
    from training.ope import (
        Candidate,
        LoggedImpressions,
        RerankPolicy,
        estimate,
        format_estimate,
        load_candidate,
        load_rerank_candidate,
        read_spec,
        to_json,
        true_ctr,
        true_rerank_ctr,
    )
    from training.pipeline import world_of
    from training.simulate import ServeConfig, ServePolicy

    settings = load(LogSettings)
    url = args.redis_url or settings.redis_url
    if not url:
        raise ConfigError("ope reads the log from Redis: give --redis-url or REDIS_URL")
    clip = DEFAULT_CLIP if args.clip is None else args.clip
    spec = read_spec(args.policy, args.root)
    client = mesh_redis.blocking_client(url, socket_timeout=30.0, socket_connect_timeout=2.0)
    try:
        examples = read_examples(
            client,
            args.tenant,
            n_users=int(spec.artifact_set.open_array("user_features").shape[0]),
            item_categories=spec.artifact_set.open_array("item_categories"),
            history_cap=settings.history_cap,
        )
    except redis.RedisError as exc:
        raise ConfigError(f"cannot read the log of {args.tenant!r} at {url}: {exc}") from exc
    finally:
        client.close()
    candidate: Candidate[RerankPolicy] | Candidate[ServePolicy]
    if examples.supports:
        candidate = load_rerank_candidate(spec, args.root, cache=False)
        n_items = int(spec.artifact_set.open_array("item_categories").shape[0])
        log = LoggedImpressions.from_supported(examples, n_items, candidate.policy.slate)
    else:
        candidate = load_candidate(spec, args.root, cache=args.truth)
        log = LoggedImpressions.from_examples(examples)
        certain = int((log.propensities >= 1.0).sum())
        if certain:
            raise ConfigError(
                f"{certain} impressions of {args.tenant!r} log propensity 1 and no answer "
                "logs its support: the log holds probabilities conditional on candidates "
                "it does not record, not the probability of showing the item that "
                "off-policy estimates need (docs/experiments.md, Off-policy evaluation)"
            )
    policy = candidate.policy
    try:
        estimated = estimate(log, policy, clip=clip)
    except ValueError as exc:
        raise ConfigError(f"the log of {args.tenant!r} cannot be evaluated: {exc}") from exc
    truth = None
    if args.truth:
        world, _ = world_of(candidate.artifact_set)
        try:
            truth = (
                true_rerank_ctr(log, policy, world)
                if isinstance(policy, RerankPolicy)
                else true_ctr(policy, world, ServeConfig().unknown_share)
            )
        except ValueError as exc:
            raise ConfigError(f"--truth: {exc}") from exc
    counts = examples.counts
    if args.json:
        print(
            json.dumps(
                {
                    "tenant": args.tenant,
                    "kind": "final stage" if isinstance(policy, RerankPolicy) else "serve",
                    "policy": candidate.description,
                    "log": {
                        "entries": counts.entries,
                        "impressions": counts.impressions,
                        "unknown_items": counts.unknown_items,
                        "skipped_requests": log.skipped_requests,
                    },
                    **to_json(estimated),
                    "true_ctr": truth,
                }
            )
        )
        return 0
    described = candidate.description
    weights = ", ".join(f"{h} {w:g}" for h, w in described["head_weights"].items())
    if isinstance(policy, ServePolicy):
        print(
            f"candidate {described['artifacts']}: {described['candidates']} candidates, slate "
            f"{described['slate']} with {described['explore_slots']} exploration slot(s), "
            f"heads {weights}"
        )
        left_out = "answers without propensities"
    else:
        order = "the logged order" if policy.keep_order else f"the ranker's heads {weights}"
        print(
            f"candidate final stage over the logged supports: {described['artifacts']}, "
            f"ordered by {order}; slate {policy.slate}, exploration share "
            f"{policy.explore_share:g} of a pool of {policy.explore_pool}"
        )
        left_out = "answers without a support (or a shorter one than the slate)"
    print(
        f"log of {args.tenant!r}: {estimated.impressions} impressions in {estimated.requests} "
        f"answers, {estimated.clicks} clicks; {log.skipped_requests} {left_out} and "
        f"{counts.unknown_items} impressions of unknown items left out"
    )
    print(format_estimate(estimated))
    if truth is not None:
        print(f"true CTR (the world's ground truth, exact): {truth:.4f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.evaluate import format_metrics
    from training.pipeline import reevaluate

    path = args.root / args.version if args.version else resolve_current(args.root)
    artifact_set = load_artifact_set(path, verify=True)
    started = time.perf_counter()
    metrics = reevaluate(artifact_set)
    elapsed = time.perf_counter() - started
    stored = artifact_set.metrics
    print(f"version  {artifact_set.version}\npath     {artifact_set.path}")
    print(f"evaluated in {elapsed:.1f} s")
    print(format_metrics(metrics, stored))
    differ = sorted(k for k in metrics if k not in stored or stored[k] != metrics[k])
    if not stored:
        print("(the manifest stores no metrics: built with --no-eval)")
    elif differ:
        print(f"{len(differ)} metric(s) differ from the stored ones: {', '.join(differ)}")
    else:
        print("all metrics equal the stored ones")
    return 2 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
