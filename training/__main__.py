"""Command line: ``python -m training train|eval|rollback``.

``train`` runs :func:`training.pipeline.train` and prints a summary (version, wall time
per phase, metrics). ``eval`` recomputes the metrics of an existing set (``current``, or
``--version V``) from its files, on the world regenerated from its manifest, and prints
them next to the stored ones (``!`` marks a difference; ``--check`` exits 2 if any).
``rollback`` moves ``current`` to the previous version, or to ``--to VERSION``. Artifact
problems exit with status 1 and the error on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.artifacts import load_artifact_set, resolve_current, rollback
from mesh.errors import ArtifactError


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
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        before = resolve_current(args.root).name
        after = rollback(args.root, args.to).name
        print(f"current: {before} -> {after}")
        return 0
    except ArtifactError as exc:
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
    )
    path = train(args.root, config)
    artifact_set = load_artifact_set(path, verify=False)
    timings = artifact_set.manifest["timings_s"]
    print(f"\nversion  {artifact_set.version}\npath     {path}\ncurrent  -> {path.name}")
    phases = [*PHASES, "total"]
    print("wall time (s): " + ", ".join(f"{p} {timings[p]:.1f}" for p in phases if p in timings))
    print(format_metrics(artifact_set.metrics))
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
