"""The item feature cache: LRU order, TTL, a byte bound, tenant isolation, hit rate."""

from __future__ import annotations

import numpy as np

from mesh.testing import ManualClock
from services.ranking.item_cache import ENTRY_OVERHEAD, ItemFeatureCache

DIM = 4
ENTRY = 4 * DIM + 12 + ENTRY_OVERHEAD


def rows(ids: list[int]) -> np.ndarray:
    return np.asarray([[i, i, i, i] for i in ids], dtype=np.float32)


def cats(ids: list[int]) -> np.ndarray:
    return np.asarray([i % 7 for i in ids], dtype=np.int32)


def test_hits_return_the_stored_rows_in_request_order() -> None:
    cache = ItemFeatureCache(100 * ENTRY, ttl_s=60)
    cache.put("t", [1, 2, 3], rows([1, 2, 3]), cats([1, 2, 3]))
    found = cache.lookup("t", [3, 9, 1])
    assert found.hit.tolist() == [True, False, True]
    assert found.rows[:, 0].tolist() == [3.0, 1.0]
    assert found.categories.tolist() == [3, 1]
    assert cache.hit_rate == 2 / 3


def test_tenants_do_not_share_rows() -> None:
    cache = ItemFeatureCache(100 * ENTRY, ttl_s=60)
    cache.put("a", [1], rows([1]), cats([1]))
    assert not cache.lookup("b", [1]).hit.any()


def test_rows_expire_after_the_ttl() -> None:
    clock = ManualClock()
    cache = ItemFeatureCache(100 * ENTRY, ttl_s=10, clock=clock)
    cache.put("t", [1, 2], rows([1, 2]), cats([1, 2]))
    clock.now = 9.9
    assert cache.lookup("t", [1]).hits == 1
    clock.now = 10.0
    assert cache.lookup("t", [1, 2]).hits == 0
    assert len(cache) == 0
    cache.put("t", [3], rows([3]), cats([3]))  # a freed slot is reused
    assert cache.lookup("t", [3]).rows[:, 0].tolist() == [3.0]


def test_the_least_recently_used_row_is_evicted_at_capacity() -> None:
    cache = ItemFeatureCache(3 * ENTRY, ttl_s=60)
    cache.put("t", [1, 2, 3], rows([1, 2, 3]), cats([1, 2, 3]))
    assert cache.capacity == 3
    cache.lookup("t", [1])  # 1 is now the most recently used
    cache.put("t", [4], rows([4]), cats([4]))
    assert cache.lookup("t", [1, 2, 3, 4]).hit.tolist() == [True, False, True, True]
    found = cache.lookup("t", [4, 3, 1])
    assert found.rows[:, 0].tolist() == [4.0, 3.0, 1.0]


def test_memory_stays_within_the_budget() -> None:
    budget = 1000 * ENTRY
    cache = ItemFeatureCache(budget, ttl_s=60)
    for start in range(0, 50_000, 500):
        ids = list(range(start, start + 500))
        cache.put("t", ids, rows(ids), cats(ids))
    assert len(cache) == cache.capacity == 1000
    assert cache.reserved_bytes + len(cache) * ENTRY_OVERHEAD <= budget
    assert cache.lookup("t", [49_999]).hits == 1
    assert cache.lookup("t", [0]).hits == 0


def test_a_batch_larger_than_the_cache_keeps_its_last_rows() -> None:
    cache = ItemFeatureCache(3 * ENTRY, ttl_s=60)
    ids = [10, 11, 12, 13, 14]
    cache.put("t", ids, rows(ids), cats(ids))
    found = cache.lookup("t", ids)
    assert found.hit.tolist() == [False, False, True, True, True]
    assert found.rows[:, 0].tolist() == [12.0, 13.0, 14.0]


def test_another_row_width_empties_the_cache() -> None:
    cache = ItemFeatureCache(100 * ENTRY, ttl_s=60)
    cache.put("t", [1], rows([1]), cats([1]))
    cache.put("t", [2], np.ones((1, 8), dtype=np.float32), cats([2]))
    assert cache.lookup("t", [1, 2]).hit.tolist() == [False, True]


def test_a_zero_budget_disables_the_cache() -> None:
    cache = ItemFeatureCache(0, ttl_s=60)
    cache.put("t", [1], rows([1]), cats([1]))
    assert cache.lookup("t", [1]).hits == 0
