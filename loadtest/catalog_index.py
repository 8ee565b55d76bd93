"""``python -m loadtest.catalog_index``: the live ANN index under catalogue churn.

Retrieval serves a set's FAISS index read-only; a live catalogue (issue 16) layers a delta
index of upserted items and a bitmap of hidden set items on it
(:class:`services.retrieval.live.LiveIndex`). This benchmark measures, on an artifact set
(``--artifacts``, a root or a version directory; 1M items for the committed figures):

* **recall@100 after churn.** ``--churn`` of the set's items (10 %) are deleted and as many
  new items upserted: each a random set item's features plus Gaussian noise
  (``--noise`` standard deviations, the category block kept), in the source item's
  category, embedded with the set's ``item_tower.onnx``. For ``--queries`` users (their
  user-tower embeddings), the live index's top 100 against the exact top 100 over the
  churned catalogue, next to a full rebuild of the set's kind of index over the churned
  catalogue (:func:`training.index.build_index`: the same type, ``nlist`` and ``nprobe``)
  against the same truth, and the set's own index before churn against the exact top 100
  of the original catalogue.
* **Upserts per second** into the delta, embedding included: new items in batches of 100
  and of 1 into an empty delta; then single upserts on the churned index (delta of
  100k): a new id, a set item (hidden in the main index), an id the delta holds (replaced),
  and single deletes. Each both sustained (over the run) and from the median write's time
  (the machine is shared: the median is what a write costs when nothing preempts it).
* **Search latency** p50/p99 of one query (``--k`` results, retrieval's default ``ann_k``)
  through the set's index alone, and through the live index with 0, 10k and 100k delta
  items, and churned (10 % hidden plus the delta).
* **Memory per million items**: the main index and the delta, as accounted by
  :meth:`LiveIndex.memory` and as the process's resident set grew while loading or filling
  them.

The whole run is single-threaded (retrieval's FAISS setting) and writes the block
``catalog-index`` of ``--out`` (``docs/bench/catalog_index.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from core.artifacts import MANIFEST, load_artifact_set, resolve_current
from loadtest.harness import machine
from loadtest.reporting import command_line, percentile, table, write_block
from mesh.paths import PROJECT_ROOT
from services.retrieval.index import RetrievalModels
from services.retrieval.live import LiveIndex
from training.index import build_index
from training.world import CATEGORY_EMBED_DIM

BLOCK = "catalog-index"
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class NewItems:
    """Items the catalogue gains: features, categories and ids (after the set's)."""

    ids: I64
    features: F32
    categories: I64


def new_items(models: RetrievalModels, count: int, noise: float, seed: int) -> NewItems:
    """``count`` new items: random set items' features plus noise outside the category
    block, in the source item's category."""
    features = np.load(models.path / "item_features.npy", mmap_mode="r")
    categories = np.load(models.path / "item_categories.npy", mmap_mode="r")
    rng = np.random.default_rng(seed)
    source = np.sort(rng.choice(features.shape[0], size=count, replace=False))
    x = np.array(features[source], dtype=np.float32)
    start = x.shape[1] - CATEGORY_EMBED_DIM - 2
    keep = np.zeros(x.shape[1], dtype=bool)
    keep[start : start + CATEGORY_EMBED_DIM] = True
    x[:, ~keep] += noise * rng.standard_normal((count, int((~keep).sum()))).astype(np.float32)
    n = int(features.shape[0])
    return NewItems(
        ids=np.arange(n, n + count, dtype=np.int64),
        features=x,
        categories=np.asarray(categories[source], dtype=np.int64),
    )


def exact_top(vectors: F32, ids: I64, queries: F32, k: int) -> I64:
    """The exact top ``k`` ids by inner product (flat search)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, rows = flat.search(queries, k)
    return np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


def recall(found: I64, truth: I64) -> float:
    """Mean share of each row of ``truth`` found in the same row of ``found``."""
    k = truth.shape[1]
    return float(np.mean([np.isin(t, f).sum() / k for f, t in zip(found, truth, strict=True)]))


def rss_bytes() -> int:
    """The process's resident set size."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def latencies_ms(search: Callable[[F32], object], queries: F32) -> tuple[float, float]:
    """p50 and p99 of ``search`` over single queries, in ms, after 50 warm-up calls."""
    for q in queries[:50]:
        search(q[None, :])
    times = []
    for q in queries:
        started = time.perf_counter()
        search(q[None, :])
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50) or 0.0, percentile(times, 99) or 0.0


def per_second(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}"


@dataclass(frozen=True)
class Rate:
    """Writes per second over a run (sustained, preemptions included) and from the median
    write's time (what one write costs when the machine's other work does not interrupt
    it; the machine is shared)."""

    sustained: float
    median: float
    embed_share: float = 0.0


def upsert_rate(
    models: RetrievalModels, live: LiveIndex, items: NewItems, batch: int, count: int
) -> Rate:
    """Items per second of embed + upsert in batches of ``batch`` (``count`` items), and
    the share of the time spent embedding."""
    embed_s: list[float] = []
    total_s: list[float] = []
    count = min(count, items.ids.size)
    for start in range(0, count, batch):
        chunk = slice(start, start + batch)
        began = time.perf_counter()
        vectors = models.embed_items(items.features[chunk], items.categories[chunk])
        embedded = time.perf_counter()
        live.upsert(items.ids[chunk], vectors)
        total_s.append(time.perf_counter() - began)
        embed_s.append(embedded - began)
    return Rate(
        sustained=count / sum(total_s),
        median=batch / float(np.median(total_s)),
        embed_share=sum(embed_s) / sum(total_s),
    )


def single_ops_rate(operation: Callable[[int], object], count: int) -> Rate:
    times = []
    for i in range(count):
        began = time.perf_counter()
        operation(i)
        times.append(time.perf_counter() - began)
    return Rate(sustained=count / sum(times), median=1 / float(np.median(times)))


def user_queries(models: RetrievalModels, count: int, seed: int) -> F32:
    users = np.load(models.path / "user_features.npy", mmap_mode="r")
    rows = np.sort(np.random.default_rng(seed).choice(users.shape[0], count, replace=False))
    out = models.user_tower.run(None, {"user_features": np.asarray(users[rows])})
    return np.ascontiguousarray(out[0], dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.catalog_index", description=__doc__)
    parser.add_argument("--artifacts", type=Path, default=PROJECT_ROOT / "artifacts")
    parser.add_argument("--churn", type=float, default=0.1, help="share deleted and added")
    parser.add_argument("--noise", type=float, default=0.3, help="feature noise of new items")
    parser.add_argument("--queries", type=int, default=1000, help="users for recall")
    parser.add_argument("--latency-queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=500, help="results per latency query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs/bench/catalog_index.md")
    args = parser.parse_args(argv)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.perf_counter()
    cpu_began = time.process_time()
    path = args.artifacts
    if not (path / MANIFEST).is_file():
        path = resolve_current(path)

    models = RetrievalModels(path)
    n, dim = models.index.ntotal, models.index.d
    ann = load_artifact_set(models.path, verify=False).config.get("ann", {})
    print(f"loaded {models.version}: {n} items, {ann}", flush=True)
    rss = rss_bytes()
    second_copy = faiss.read_index(str(models.index_path))
    main_rss = rss_bytes() - rss
    del second_copy
    embeddings = np.load(models.path / "item_embeddings.npy")
    churn = round(args.churn * n)
    rng = np.random.default_rng(args.seed)
    deleted = np.sort(rng.choice(n, size=churn, replace=False)).astype(np.int64)
    items = new_items(models, churn, args.noise, args.seed + 1)
    began_embed = time.perf_counter()
    new_vectors = models.embed_items(items.features, items.categories)
    bulk_embed_s = time.perf_counter() - began_embed
    queries = user_queries(models, args.queries + args.latency_queries, args.seed + 2)
    recall_q, latency_q = queries[: args.queries], queries[args.queries :]

    # Recall before churn, then after: live index and a full rebuild, against exact search.
    all_ids = np.arange(n, dtype=np.int64)
    truth_before = exact_top(embeddings, all_ids, recall_q, 100)
    _, before_rows = models.index.search(recall_q, 100)
    recall_before = recall(before_rows, truth_before)
    kept = np.ones(n, dtype=bool)
    kept[deleted] = False
    churned_vectors = np.concatenate([embeddings[kept], new_vectors])
    churned_ids = np.concatenate([all_ids[kept], items.ids])
    del embeddings
    truth_after = exact_top(churned_vectors, churned_ids, recall_q, 100)
    live = LiveIndex.of(models)
    live.remove(deleted)
    rss = rss_bytes()
    for start in range(0, churn, 1000):
        live.upsert(items.ids[start : start + 1000], new_vectors[start : start + 1000])
    delta_rss = rss_bytes() - rss
    live_ids, _ = live.search(recall_q, 100)
    recall_live = recall(live_ids, truth_after)
    new_in_truth = np.isin(truth_after, items.ids)
    found_new = sum(
        int(np.isin(t[m], f).sum())
        for t, m, f in zip(truth_after, new_in_truth, live_ids, strict=True)
    ) / max(int(new_in_truth.sum()), 1)
    began_rebuild = time.perf_counter()
    rebuilt, spec = build_index(churned_vectors, seed=args.seed)
    rebuild_s = time.perf_counter() - began_rebuild
    faiss.omp_set_num_threads(1)
    _, rebuilt_rows = rebuilt.search(recall_q, 100)
    recall_rebuilt = recall(churned_ids[rebuilt_rows], truth_after)
    if (spec.type, spec.nlist, spec.nprobe) != (
        ann.get("type"),
        ann.get("nlist"),
        ann.get("nprobe"),
    ):
        print(f"warning: the rebuild is {spec}, the set's index {ann}", flush=True)
    del rebuilt, churned_vectors
    print(
        f"recall@100: before {recall_before:.4f}, live {recall_live:.4f}, "
        f"rebuilt {recall_rebuilt:.4f}",
        flush=True,
    )

    # Latency: the set's index alone, the live index with growing deltas, churned.
    latency: list[tuple[str, tuple[float, float]]] = []
    latency.append(
        ("set index alone", latencies_ms(lambda q: models.index.search(q, args.k), latency_q))
    )
    for size in (0, 10_000, 100_000):
        fresh = LiveIndex.of(models)
        for start in range(0, min(size, churn), 1000):
            stop = min(start + 1000, size)
            fresh.upsert(items.ids[start:stop], new_vectors[start:stop])
        label = f"live, delta {fresh.counts().delta_items:,}, nothing hidden"
        latency.append((label, latencies_ms(partial(fresh.search, k=args.k), latency_q)))
        del fresh
    churned_label = f"live, churned: {churn:,} hidden, delta {live.counts().delta_items:,}"
    latency.append((churned_label, latencies_ms(lambda q: live.search(q, args.k), latency_q)))
    print("latency done", flush=True)

    # Upserts per second (embedding included), then single writes on the churned index.
    rates = []
    for batch, count in ((100, 10_000), (1, 2_000)):
        empty = LiveIndex.of(models)
        rate = upsert_rate(models, empty, items, batch, count)
        rates.append((f"new items, batches of {batch}, into an empty delta", rate))
    extra = new_items(models, 2000, args.noise, args.seed + 3)
    extra_ids = extra.ids + churn
    kept_ids = all_ids[kept]

    def upsert_one(ids: I64, i: int) -> None:
        vector = models.embed_items(extra.features[i : i + 1], extra.categories[i : i + 1])
        live.upsert(ids[i : i + 1], vector)

    singles: list[tuple[str, Callable[[int], object]]] = [
        ("upsert a new id", lambda i: upsert_one(extra_ids, i)),
        ("upsert a set item (hidden in the main index)", lambda i: upsert_one(kept_ids, i)),
        ("upsert an id the delta holds (replace)", lambda i: upsert_one(items.ids, i)),
        ("delete a set item", lambda i: live.remove(kept_ids[1000 + i : 1001 + i])),
        ("delete a delta item", lambda i: live.remove(items.ids[1000 + i : 1001 + i])),
    ]
    delta_before = live.counts().delta_items
    single_rates = [(name, single_ops_rate(op, 200)) for name, op in singles]
    print("upserts done", flush=True)

    memory = live.memory()
    counts = live.counts()
    per_million = 1_000_000
    lines = [
        "```",
        command_line("loadtest.catalog_index", list(argv) if argv is not None else sys.argv[1:]),
        "```",
        "",
    ]
    box = machine()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines += [
        f"- date: {started}; the run took {time.perf_counter() - began:.0f} s "
        f"({time.process_time() - cpu_began:.0f} s of CPU)",
        f"- machine: {box['cpu']}, {box['memory']} RAM, {box['os']}; load average {load} at "
        f"the end (the machine is shared); commit {box['commit']}",
        f"- software: faiss {faiss.__version__}, numpy {np.__version__}; one FAISS thread",
        f"- artifact set {models.version}: {n:,} items, {dim}-d, index "
        f"{spec.type} (nlist {spec.nlist}, nprobe {spec.nprobe})",
        f"- churn: {churn:,} set items deleted, {churn:,} new items (a set item's features "
        f"plus N(0, {args.noise}²) noise outside the category block) embedded with "
        f"item_tower.onnx ({churn / bulk_embed_s:,.0f} items/s in one batch) and upserted",
        "",
        "### Recall@100 against exact search",
        "",
        *table(
            ["index", "catalogue", "recall@100"],
            "llr",
            [
                ["the set's index", "as trained", f"{recall_before:.4f}"],
                ["live: set index, deletions hidden, + delta", "churned", f"{recall_live:.4f}"],
                [
                    f"full rebuild ({rebuild_s:.0f} s, one thread)",
                    "churned",
                    f"{recall_rebuilt:.4f}",
                ],
            ],
        ),
        "",
        f"{args.queries} users' queries; of the exact top 100 after churn "
        f"{new_in_truth.mean():.1%} are new items, and the live index finds "
        f"{found_new:.4f} of those.",
        "",
        "### Writes",
        "",
        *table(
            ["write", "items/s sustained", "items/s, median batch", "embedding's share"],
            "lrrr",
            [
                [name, f"{r.sustained:,.0f}", f"{r.median:,.0f}", f"{r.embed_share:.0%}"]
                for name, r in rates
            ],
        ),
        "",
        *table(
            [
                f"one write on the churned index (delta {delta_before:,})",
                "per second sustained",
                "per second, median write",
            ],
            "lrr",
            [[name, f"{r.sustained:,.0f}", f"{r.median:,.0f}"] for name, r in single_rates],
        ),
        "",
        f"### Search latency (one query, k = {args.k}, {len(latency_q)} queries)",
        "",
        *table(
            ["index", "p50 ms", "p99 ms"],
            "lrr",
            [[name, f"{p50:.2f}", f"{p99:.2f}"] for name, (p50, p99) in latency],
        ),
        "",
        "### Memory per million items",
        "",
        *table(
            ["part", "accounted, bytes/item", "resident set growth, bytes/item", "MB per million"],
            "lrrr",
            [
                [
                    "set index (main)",
                    f"{memory.main_bytes / n:.0f}",
                    f"{main_rss / n:.0f}",
                    f"{memory.main_bytes / n * per_million / 2**20:.0f}",
                ],
                [
                    "delta",
                    f"{memory.delta_bytes / counts.delta_items:.0f}",
                    f"{delta_rss / churn:.0f}",
                    f"{memory.delta_bytes / counts.delta_items * per_million / 2**20:.0f}",
                ],
                [
                    "per set item state (hidden bitmap, state byte)",
                    f"{memory.overlay_bytes / n:.2f}",
                    "—",
                    f"{memory.overlay_bytes / n * per_million / 2**20:.1f}",
                ],
            ],
        ),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_block(args.out, BLOCK, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
