"""The live ANN index: upserts findable, removals never returned, replacements in place,
over the set's flat index and over an IVF index, with the popular list minus removals."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import pytest

from core.artifacts import resolve_current
from mesh.errors import InvalidArgument
from services.retrieval.index import RetrievalModels
from services.retrieval.live import LiveIndex

F32 = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def models(artifacts_root: Path) -> RetrievalModels:
    return RetrievalModels(resolve_current(artifacts_root))


@pytest.fixture(scope="module")
def embeddings(models: RetrievalModels) -> F32:
    return np.asarray(np.load(models.path / "item_embeddings.npy"))


def ivf_index(embeddings: F32, nprobe: int = 4) -> faiss.Index:
    """An IVF-Flat index over the set's embeddings (row ids = item ids), like the sets of
    200k items and more have, small enough for a test."""
    dim = embeddings.shape[1]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 32, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = 1
    ivf.train(embeddings)
    ivf.add(embeddings)
    ivf.nprobe = nprobe
    return ivf


@pytest.fixture(params=["flat", "ivf"])
def live(request: pytest.FixtureRequest, models: RetrievalModels, embeddings: F32) -> LiveIndex:
    if request.param == "flat":
        return LiveIndex.of(models)
    return LiveIndex(ivf_index(embeddings), models.popular_ids, models.popular_scores)


def unit(rows: int, dim: int, seed: int) -> F32:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    norms: F32 = np.linalg.norm(x, axis=1, keepdims=True)
    return x / norms


def everything(live: LiveIndex, queries: F32) -> npt.NDArray[np.int64]:
    """Every id a search can return for ``queries`` (k = all items)."""
    counts = live.counts()
    ids, _ = live.search(queries, counts.set_items + counts.delta_items)
    return ids


def test_an_upserted_item_is_found_by_its_own_embedding(live: LiveIndex) -> None:
    new = np.array([1_000_000, 5_000_000_000], dtype=np.int64)
    vectors = unit(2, live.dim, 1)
    live.upsert(new, vectors)
    ids, scores = live.search(vectors, 10)
    assert ids[:, 0].tolist() == new.tolist()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    counts = live.counts()
    assert (counts.delta_items, counts.new_items, counts.set_overridden) == (2, 2, 0)
    assert counts.servable == live.set_items + 2


def test_removed_items_are_never_returned(live: LiveIndex, embeddings: F32) -> None:
    new = np.array([3000, 3001], dtype=np.int64)
    vectors = unit(2, live.dim, 2)
    live.upsert(new, vectors)
    gone = np.array([7, 8, 3000], dtype=np.int64)
    assert live.remove(gone) == 3
    assert live.remove(gone) == 0  # already removed
    queries = np.concatenate([embeddings[[7, 8]], vectors])
    assert not np.isin(everything(live, queries), gone).any()
    ids, _ = live.search(vectors[1], 1)
    assert ids.tolist() == [[3001]]
    counts = live.counts()
    assert (counts.set_removed, counts.delta_items, counts.new_items) == (2, 1, 1)
    assert counts.servable == live.set_items - 2 + 1


def test_an_upsert_replaces_the_copy_the_delta_holds(live: LiveIndex) -> None:
    first, second = unit(2, live.dim, 3)
    live.upsert(np.array([4242]), first[None, :])
    live.upsert(np.array([4242]), second[None, :])
    assert live.counts().delta_items == 1
    ids, scores = live.search(np.stack([first, second]), live.set_items + 1)
    for row in range(2):
        assert (ids[row] == 4242).sum() == 1
    # Found by its new vector, scored by it against the old one.
    assert ids[1, 0] == 4242 and scores[1, 0] == pytest.approx(1.0, abs=1e-5)
    at = int(np.flatnonzero(ids[0] == 4242)[0])
    assert scores[0, at] == pytest.approx(float(first @ second), abs=1e-5)
    # Within one call the last row of a repeated id wins.
    live.upsert(np.array([4242, 4242]), np.stack([second, first]))
    ids, _ = live.search(first, 1)
    assert ids.tolist() == [[4242]] and live.counts().delta_items == 1


def test_a_set_item_upserted_is_served_once_from_the_delta(
    live: LiveIndex, embeddings: F32
) -> None:
    item = 5
    vector = unit(1, live.dim, 4)
    live.upsert(np.array([item]), vector)
    found = everything(live, np.concatenate([vector, embeddings[[item]]]))
    assert ((found == item).sum(axis=1) == 1).all()
    ids, scores = live.search(vector, 1)
    assert ids.tolist() == [[item]] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    counts = live.counts()
    assert (counts.set_overridden, counts.new_items, counts.set_removed) == (1, 0, 0)
    assert counts.servable == live.set_items
    # Removing it drops the delta copy and keeps the set's copy hidden.
    assert live.remove(np.array([item])) == 1
    assert not (everything(live, np.concatenate([vector, embeddings[[item]]])) == item).any()
    assert live.counts().delta_items == 0
    # Upserting it again serves the new vector.
    live.upsert(np.array([item]), vector)
    assert live.search(vector, 1)[0].tolist() == [[item]]


def test_restore_serves_a_removed_set_item_again(live: LiveIndex, embeddings: F32) -> None:
    live.remove(np.array([11, 12, 7777]))
    assert live.restore(np.array([11, 7777, 13])) == 1  # 7777 is no set item, 13 not removed
    ids, _ = live.search(embeddings[[11, 12]], live.set_items)
    assert (ids[0] == 11).any() and not (ids == 12).any()
    live.restore(np.array([12]))
    assert live.counts().set_removed == 0
    assert live.search(embeddings[12], 1)[0].tolist() == [[12]]


def test_search_equals_exact_search_over_the_servable_catalogue(
    models: RetrievalModels, embeddings: F32
) -> None:
    """Over the flat set index the merged answer is exactly the brute-force top k of the
    servable items: set items not removed nor overridden, plus the delta."""
    live = LiveIndex.of(models)
    rng = np.random.default_rng(5)
    removed = rng.choice(live.set_items, 300, replace=False)
    overridden = rng.choice(np.setdiff1d(np.arange(live.set_items), removed), 50, replace=False)
    new = np.arange(live.set_items, live.set_items + 200)
    live.remove(removed)
    changed = unit(250, live.dim, 6)
    live.upsert(np.concatenate([overridden, new]), changed)
    catalogue = embeddings.copy()
    catalogue[removed] = np.nan
    catalogue[overridden] = changed[:50]
    catalogue = np.concatenate([catalogue, changed[50:]])
    queries = unit(20, live.dim, 7)
    exact = np.nan_to_num(queries @ catalogue.T, nan=-np.inf)
    want = np.argsort(-exact, axis=1, kind="stable")[:, :100]
    ids, scores = live.search(queries, 100)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want, axis=1), atol=1e-5)
    assert (ids == want).mean() > 0.99  # equal up to ties


def test_replaced_and_removed_delta_rows_are_compacted_away(models: RetrievalModels) -> None:
    """Replacing or removing a delta item leaves a tombstone that searches skip; once they
    are a quarter of the delta's rows the rows are rewritten without them. Answers equal
    exact search over the delta's current vectors throughout."""
    live = LiveIndex.of(models)
    live.remove(np.arange(live.set_items))  # only the delta answers
    current: dict[int, F32] = {}
    queries = unit(10, live.dim, 15)

    def check() -> None:
        ids = np.array(sorted(current), dtype=np.int64)
        vectors = np.stack([current[i] for i in ids.tolist()])
        exact = queries @ vectors.T
        want = np.sort(exact, axis=1)[:, ::-1][:, :20]
        got_ids, got = live.search(queries, 20)
        np.testing.assert_allclose(got, want, atol=1e-5)
        rows = np.searchsorted(ids, got_ids)
        np.testing.assert_allclose(np.take_along_axis(exact, rows, axis=1), got, atol=1e-5)
        assert live.counts().delta_items == len(current)

    def upsert(ids: npt.NDArray[np.int64], seed: int) -> None:
        vectors = unit(ids.size, live.dim, seed)
        live.upsert(ids, vectors)
        current.update(zip(ids.tolist(), vectors, strict=True))

    upsert(np.arange(10_000, 13_000), 16)
    check()
    upsert(np.arange(10_000, 10_900), 17)  # replaced: 900 tombstones
    assert live.counts().delta_tombstones == 900
    check()
    gone = np.arange(12_000, 12_200)
    live.remove(gone)  # 1100 tombstones, over a quarter of 3900 rows: compacted
    for item in gone.tolist():
        del current[item]
    assert live.counts().delta_tombstones == 0
    check()
    upsert(np.arange(12_100, 12_300), 18)  # half new, half replaced
    assert live.counts().delta_tombstones == 100
    check()


def test_ivf_searches_keep_the_index_nprobe(models: RetrievalModels, embeddings: F32) -> None:
    """Search parameters replace the index's own: with a selector the IVF index must still
    probe its ``nprobe`` lists (FAISS's default in the parameters is 1)."""
    index = ivf_index(embeddings, nprobe=8)
    live = LiveIndex(index, models.popular_ids, models.popular_scores)
    queries = unit(30, live.dim, 8)
    plain_scores, plain_ids = index.search(queries, 50)
    outside = np.setdiff1d(np.arange(live.set_items), plain_ids)[:5]
    live.remove(outside)  # hides ids no query returns: results must not change
    ids, scores = live.search(queries, 50)
    np.testing.assert_array_equal(ids, plain_ids)
    np.testing.assert_allclose(scores, plain_scores, atol=1e-6)


def test_short_answers_are_padded(models: RetrievalModels) -> None:
    live = LiveIndex.of(models)
    live.remove(np.arange(live.set_items - 3))
    live.upsert(np.array([99_999]), unit(1, live.dim, 9))
    ids, scores = live.search(unit(2, live.dim, 10), 6)
    assert ids.shape == scores.shape == (2, 6)
    assert (ids[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    assert set(ids[0, :4].tolist()) == {
        live.set_items - 3,
        live.set_items - 2,
        live.set_items - 1,
        99_999,
    }
    one_ids, _ = live.search_one(unit(1, live.dim, 10)[0], 6)
    assert one_ids.shape == (4,)


def test_popular_skips_removed_items(models: RetrievalModels) -> None:
    live = LiveIndex.of(models)
    top = models.popular_ids[:5]
    live.remove(top[[0, 2]])
    live.upsert(top[[1]], unit(1, live.dim, 11))  # overridden, still servable
    ids, scores = live.popular(3)
    assert ids.tolist() == top[[1, 3, 4]].tolist()
    np.testing.assert_array_equal(scores, models.popular_scores[[1, 3, 4]])
    live.restore(top[[0]])
    assert live.popular(2)[0].tolist() == top[[0, 1]].tolist()


def test_memory_counts_the_delta(models: RetrievalModels) -> None:
    live = LiveIndex.of(models)
    before = live.memory()
    assert before.main_bytes == live.set_items * live.dim * 4
    assert before.delta_bytes < 1024
    live.upsert(np.arange(10_000, 11_000), unit(1000, live.dim, 12))
    after = live.memory()
    assert after.delta_bytes - before.delta_bytes >= 1000 * (live.dim * 4 + 8)
    assert after.delta_bytes - before.delta_bytes < 1000 * (live.dim * 4 + 200)
    assert after.overlay_bytes == before.overlay_bytes


def test_bad_input_is_refused(models: RetrievalModels) -> None:
    live = LiveIndex.of(models)
    with pytest.raises(InvalidArgument, match="non-negative"):
        live.upsert(np.array([-1]), unit(1, live.dim, 13))
    with pytest.raises(InvalidArgument, match="embeddings must be"):
        live.upsert(np.array([1, 2]), unit(1, live.dim, 13))
    with pytest.raises(InvalidArgument, match="finite"):
        live.upsert(np.array([1]), np.full((1, live.dim), np.nan, np.float32))
    with pytest.raises(InvalidArgument, match="queries"):
        live.search(np.zeros((1, live.dim + 1), np.float32), 5)
    with pytest.raises(InvalidArgument, match="k must be"):
        live.search(np.zeros(live.dim, np.float32), 0)
    assert live.counts().delta_items == 0


def test_searches_in_threads_see_whole_writes(models: RetrievalModels) -> None:
    """Readers in threads while one writer churns: every answer is sorted, has each id at
    most once, and never holds an id removed before the search started."""
    live = LiveIndex.of(models)
    vectors = unit(400, live.dim, 14)
    stop = threading.Event()
    removed_before: list[set[int]] = []
    problems: list[str] = []
    lock = threading.Lock()
    gone: set[int] = set()

    def read(seed: int) -> None:
        queries = unit(4, live.dim, seed)
        while not stop.is_set():
            with lock:
                snapshot = set(gone)
            ids, scores = live.search(queries, 50)
            for row in range(ids.shape[0]):
                found = ids[row][ids[row] >= 0]
                if np.unique(found).size != found.size:
                    problems.append("duplicate")
                if (np.diff(scores[row]) > 1e-6).any():
                    problems.append("unsorted")
                if snapshot & set(found.tolist()):
                    problems.append("removed id returned")
        removed_before.append(snapshot)

    readers = [threading.Thread(target=read, args=(20 + i,)) for i in range(2)]
    for thread in readers:
        thread.start()
    try:
        for step in range(200):
            batch = np.array([5000 + step, step % 50], dtype=np.int64)
            live.upsert(batch, vectors[2 * step : 2 * step + 2])
            if step % 3 == 0:
                victims = np.array([5000 + step, 100 + step], dtype=np.int64)
                live.remove(victims)
                with lock:
                    gone.update(victims.tolist())
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert problems == []
    assert len(removed_before) == 2
