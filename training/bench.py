"""Serving-side timings of a built artifact set, measured the way the services load it.

``python -m training.bench --root artifacts [--version V] [--k 500] [--queries 1000]``

* ``verify_s``: :func:`core.artifacts.load_artifact_set` with sha256 verification.
* ``index_load_s``: ``faiss.read_index`` of ``ann.faiss`` (plus setting ``nprobe`` from
  the manifest), what the retrieval service does at start-up.
* ``ann_ms``: per-query latency of ``index.search(embedding [1, D], k)`` on one thread
  (``faiss.omp_set_num_threads(1)``, as the retrieval service sets it), over the
  embeddings of ``queries`` seeded-random users, after 20 warm-up queries.
* ``user_tower_ms``: per-query latency of the user tower (onnxruntime, one thread, batch 1).

Torch-free. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort

from core.artifacts import load_artifact_set, resolve_current

WARM_UP = 20


def _percentiles(samples_s: list[float]) -> str:
    ms = sorted(1000.0 * s for s in samples_s)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"median {statistics.median(ms):.3f} ms, p90 {p90:.3f} ms, p99 {p99:.3f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("artifacts"))
    parser.add_argument("--version", metavar="V", help="default: the current version")
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    path = args.root / args.version if args.version else resolve_current(args.root)
    started = time.perf_counter()
    artifacts = load_artifact_set(path, verify=True)
    verify_s = time.perf_counter() - started

    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    index = faiss.read_index(str(artifacts.file("ann_index")))
    nprobe = artifacts.config.get("ann", {}).get("nprobe")
    if nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    index_load_s = time.perf_counter() - started

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    tower = ort.InferenceSession(
        str(artifacts.file("user_tower")), options, providers=["CPUExecutionProvider"]
    )
    users = np.load(artifacts.file("user_features"), mmap_mode="r")
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(users.shape[0], size=min(args.queries, users.shape[0]), replace=False)
    features = np.asarray(users[np.sort(rows)], dtype=np.float32)

    tower_s: list[float] = []
    embeddings = []
    for i in range(features.shape[0]):
        started = time.perf_counter()
        (emb,) = tower.run(None, {"user_features": features[i : i + 1]})
        tower_s.append(time.perf_counter() - started)
        embeddings.append(np.asarray(emb, dtype=np.float32))
    for emb in embeddings[:WARM_UP]:
        index.search(emb, args.k)
    search_s: list[float] = []
    for emb in embeddings:
        started = time.perf_counter()
        index.search(emb, args.k)
        search_s.append(time.perf_counter() - started)

    ann = artifacts.config.get("ann", {})
    print(f"version        {artifacts.version}")
    print(f"index          {ann.get('type')} nlist {ann.get('nlist')} nprobe {ann.get('nprobe')}")
    print(f"items          {index.ntotal}, dim {index.d}")
    print(f"verify_s       {verify_s:.2f} (load_artifact_set with sha256 of every file)")
    print(f"index_load_s   {index_load_s:.2f}")
    print(f"ann_ms         k={args.k}, 1 thread, {len(search_s)} queries: {_percentiles(search_s)}")
    print(f"user_tower_ms  1 thread, batch 1: {_percentiles(tower_s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
