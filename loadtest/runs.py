"""What every benchmark command does around its measurement: the options naming its
artifact set and run directory, a run directory of its own (removed afterwards unless
kept), and the description of the artifact set it served.
Used by :mod:`loadtest.bench`, :mod:`loadtest.steps` and :mod:`loadtest.profile`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--artifacts`` (a root to serve; default: train a set of ``--items`` items and
    ``--users`` users with :func:`loadtest.harness.prepare_artifacts`) and ``--keep``
    (keep the run directory, see :func:`run_directory`)."""
    parser.add_argument("--artifacts", type=Path, help="artifact root to serve (default: train)")
    parser.add_argument("--items", type=int, default=10000, help="items of a trained set")
    parser.add_argument("--users", type=int, default=2000, help="users of a trained set")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")


@contextmanager
def run_directory(prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh temporary directory named ``prefix...``; on exit it is removed, or, with
    ``keep``, left in place and its path printed."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield base
    finally:
        if keep:
            print(f"run directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def describe_artifacts(artifacts: Path, explicit: Path | None, *, categories: bool = False) -> str:
    """The artifact set ``current`` points at under ``artifacts``, as a report states it:
    ``<version> (<n> users, <m> items[, <k> categories], trained by the run)``, or
    ``..., from <explicit>)`` when the set was given (``explicit``, the ``--artifacts``
    option) rather than trained.

    Raises:
        ArtifactError: no readable current artifact set.
    """
    from core.artifacts import load_artifact_set, resolve_current

    current = load_artifact_set(resolve_current(artifacts), verify=False)
    config = current.config
    sizes = f"{config['n_users']} users, {config['n_items']} items"
    if categories:
        sizes += f", {config['n_categories']} categories"
    origin = "trained by the run" if explicit is None else f"from {explicit}"
    return f"{current.version} ({sizes}, {origin})"
