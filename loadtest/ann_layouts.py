"""``python -m loadtest.ann_layouts --artifacts <set>``: recall, bytes per item and search time
of the ANN layouts docs/scaling.md weighs for a catalogue too large for one IVF-Flat copy.

On an artifact set (1M items for the figures in docs/scaling.md), for ``--queries`` users'
embeddings from the set's user tower against the exact top 100 by inner product over the
set's item embeddings, one FAISS thread (retrieval's setting):

* **the set's own index** as served (IVF-Flat; nlist and nprobe from the set);
* **range shards**: ``--shards`` IVF-Flat indexes over equal ranges of item ids, each with
  nlist = the set's nlist / shards, trained on 64k of its own items, each searched for the
  top 100 and the results merged (scatter-gather), at the set's nprobe per shard and at
  nprobe / shards per shard (the same share of each shard's lists as the set probes);
* **IVF-PQ** on the set's own coarse quantizer (its nlist and nprobe), codes of 16 and 32
  bytes (8-bit sub-quantizers trained on 100k items), raw, and with the top 400 re-scored
  exactly from the memory-mapped embeddings (what a replica without the full vectors in
  memory would do).

Bytes per item are those of the serialized index (``faiss.serialize_index``) over the item
count; latency is the median of 500 single queries after 50 warm-up ones (one shard's, for
the shards: a request pays it once per shard). About a minute of one core at 1M items,
most of it the exact search for the truth.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from loadtest.catalog_index import exact_top, recall

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
K = 100


def median_ms(search: Callable[[F32], object], queries: F32) -> float:
    """Median time of one query, ms, over 500 queries after 50 warm-up ones."""
    for q in queries[:50]:
        search(q[None, :])
    times = []
    for q in queries[:500]:
        started = time.perf_counter()
        search(q[None, :])
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def size_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


def user_queries(root: Path, count: int, seed: int) -> F32:
    users = np.load(root / "user_features.npy", mmap_mode="r")
    rows = np.sort(np.random.default_rng(seed).choice(users.shape[0], count, replace=False))
    tower = ort.InferenceSession(str(root / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    out = tower.run(None, {"user_features": np.asarray(users[rows], dtype=np.float32)})
    return np.ascontiguousarray(out[0], dtype=np.float32)


def range_shards(vectors: F32, shards: int, nlist: int) -> list[faiss.Index]:
    """IVF-Flat indexes over ``shards`` equal ranges of ids, each trained on its own items."""
    bounds = np.linspace(0, len(vectors), shards + 1).astype(np.int64)
    parts: list[faiss.Index] = []
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT
        )
        sample = np.random.default_rng(s).choice(hi - lo, min(64 * 1024, hi - lo), replace=False)
        index.train(vectors[lo:hi][sample])
        index.add_with_ids(vectors[lo:hi], np.arange(lo, hi, dtype=np.int64))
        parts.append(index)
    return parts


def gather(parts: list[faiss.Index], queries: F32, nprobe: int) -> I64:
    """Each shard's top ``K``, merged by score: the scatter-gather a router would do."""
    scores, ids = [], []
    for index in parts:
        faiss.extract_index_ivf(index).nprobe = nprobe
        s, i = index.search(queries, K)
        scores.append(s)
        ids.append(i)
    merged_scores, merged_ids = np.hstack(scores), np.hstack(ids)
    order = np.argsort(-merged_scores, axis=1)[:, :K]
    return np.asarray(np.take_along_axis(merged_ids, order, axis=1), dtype=np.int64)


def rescored(embeddings: F32, queries: F32, candidates: I64) -> I64:
    """The top ``K`` of each row of ``candidates`` by exact inner product."""
    out = np.full((len(queries), K), -1, dtype=np.int64)
    for row, (q, cand) in enumerate(zip(queries, candidates, strict=True)):
        ids = np.sort(cand[cand >= 0])
        exact = np.asarray(embeddings[ids], dtype=np.float32) @ q
        best = ids[np.argsort(-exact)[:K]]
        out[row, : len(best)] = best
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ann_layouts", description=__doc__)
    parser.add_argument("--artifacts", type=Path, required=True, help="an artifact set directory")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    root: Path = args.artifacts
    embeddings = np.load(root / "item_embeddings.npy", mmap_mode="r")
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(vectors)
    queries = user_queries(root, args.queries, 2)
    started = time.perf_counter()
    truth = exact_top(vectors, np.arange(n, dtype=np.int64), queries, K)
    print(
        f"{n} items, {vectors.shape[1]}-d; exact top {K} of {len(queries)} users' queries in ",
        end="",
    )
    print(f"{time.perf_counter() - started:.1f} s")

    served = faiss.read_index(str(root / "ann.faiss"))
    ivf = faiss.extract_index_ivf(served)
    nlist, nprobe = int(ivf.nlist), int(ivf.nprobe)
    _, found = served.search(queries, K)
    ms = median_ms(lambda q: served.search(q, K), queries)
    print(
        f"the set's IVF-Flat (nlist {nlist}, nprobe {nprobe}): recall@100 "
        f"{recall(found, truth):.4f}, {size_bytes(served) / n:.1f} B/item, p50 {ms:.3f} ms"
    )

    parts = range_shards(vectors, args.shards, nlist // args.shards)
    total = sum(size_bytes(p) for p in parts) / n
    for probe in (nprobe, max(1, nprobe // args.shards)):
        found = gather(parts, queries, probe)
        ms = median_ms(lambda q: parts[0].search(q, K), queries)
        print(
            f"{args.shards} range shards, IVF-Flat nlist {nlist // args.shards}, nprobe {probe} "
            f"each, merged: recall@100 {recall(found, truth):.4f}, {total:.1f} B/item in all, "
            f"p50 {ms:.3f} ms per shard"
        )

    sample = vectors[np.random.default_rng(9).choice(n, min(100_000, n), replace=False)]
    for m in (16, 32):
        pq = faiss.IndexIVFPQ(
            ivf.quantizer, vectors.shape[1], nlist, m, 8, faiss.METRIC_INNER_PRODUCT
        )
        pq.train(sample)
        pq.add(vectors)
        pq.nprobe = nprobe
        _, raw = pq.search(queries, K)
        _, wide = pq.search(queries, 4 * K)
        refined = rescored(embeddings, queries, np.asarray(wide, dtype=np.int64))

        def search_pq(q: F32, index: faiss.IndexIVFPQ = pq) -> object:
            return index.search(q, K)

        ms = median_ms(search_pq, queries)
        print(
            f"IVF-PQ {m} B codes (nlist {nlist}, nprobe {nprobe}): recall@100 "
            f"{recall(raw, truth):.4f} raw, {recall(refined, truth):.4f} with the top 400 "
            f"re-scored exactly; {size_bytes(pq) / n:.1f} B/item; p50 {ms:.3f} ms raw"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
