"""The gateway's assignment cache: TTL, flush on a new book, LRU bound, what is never stored."""

from __future__ import annotations

import pytest
from recmesh.experiment.v1 import experiment_pb2

from gateway.assignments import AssignmentCache
from mesh.testing import ManualClock


def answer(variant: str = "wide", version: str = "book-1") -> experiment_pb2.AssignResponse:
    return experiment_pb2.AssignResponse(
        assignments=[
            experiment_pb2.Assignment(
                experiment_key="retrieval-k", variant_key=variant, params={"retrieval.k": "600"}
            )
        ],
        book_version=version,
    )


def variants(found: list[experiment_pb2.Assignment] | None) -> list[str] | None:
    return None if found is None else [a.variant_key for a in found]


def test_an_answer_is_served_for_ttl_seconds_and_not_after() -> None:
    clock = ManualClock()
    cache = AssignmentCache(10, ttl_s=30.0, clock=clock)
    assert cache.get("demo", "u1") is None
    cache.put("demo", "u1", answer("wide"))
    clock.now = 30.0
    assert variants(cache.get("demo", "u1")) == ["wide"]
    clock.now = 30.001
    assert cache.get("demo", "u1") is None
    cache.put("demo", "u1", answer("control"))
    assert variants(cache.get("demo", "u1")) == ["control"]


def test_a_hit_extends_nothing_the_age_counts_from_the_answer() -> None:
    clock = ManualClock()
    cache = AssignmentCache(10, ttl_s=30.0, clock=clock)
    cache.put("demo", "u1", answer())
    clock.now = 20.0
    assert cache.get("demo", "u1") is not None
    clock.now = 31.0
    assert cache.get("demo", "u1") is None


def test_an_answer_from_another_book_empties_the_cache() -> None:
    cache = AssignmentCache(10, ttl_s=30.0, clock=ManualClock())
    cache.put("demo", "u1", answer("wide", "book-1"))
    cache.put("acme", "u2", answer("wide", "book-1"))
    cache.put("demo", "u3", answer("control", "book-2"))
    assert cache.get("demo", "u1") is None
    assert cache.get("acme", "u2") is None
    assert variants(cache.get("demo", "u3")) == ["control"]
    # Going back to the first book (a rollback) is a change of book too.
    cache.put("demo", "u1", answer("wide", "book-1"))
    assert cache.get("demo", "u3") is None
    assert variants(cache.get("demo", "u1")) == ["wide"]


def test_the_least_recently_used_answer_is_evicted_first() -> None:
    cache = AssignmentCache(2, ttl_s=30.0, clock=ManualClock())
    cache.put("demo", "a", answer("wide"))
    cache.put("demo", "b", answer("wide"))
    assert cache.get("demo", "a") is not None  # "b" is now the least recently used
    cache.put("demo", "c", answer("wide"))
    assert cache.get("demo", "b") is None
    assert cache.get("demo", "a") is not None
    assert cache.get("demo", "c") is not None


@pytest.mark.parametrize(("entries", "ttl_s"), [(0, 30.0), (10, 0.0), (-1, 30.0), (10, -1.0)])
def test_zero_entries_or_zero_ttl_turns_the_cache_off(entries: int, ttl_s: float) -> None:
    cache = AssignmentCache(entries, ttl_s=ttl_s, clock=ManualClock())
    cache.put("demo", "u1", answer())
    assert cache.get("demo", "u1") is None


def test_an_answer_without_a_book_version_is_not_stored() -> None:
    cache = AssignmentCache(10, ttl_s=30.0, clock=ManualClock())
    cache.put("demo", "u1", answer(version=""))
    assert cache.get("demo", "u1") is None


def test_tenants_do_not_share_answers() -> None:
    cache = AssignmentCache(10, ttl_s=30.0, clock=ManualClock())
    cache.put("demo", "u1", answer())
    assert cache.get("acme", "u1") is None


def test_an_answer_with_no_assignment_is_a_hit() -> None:
    cache = AssignmentCache(10, ttl_s=30.0, clock=ManualClock())
    cache.put("demo", "u1", experiment_pb2.AssignResponse(book_version="book-1"))
    assert cache.get("demo", "u1") == []


def test_callers_get_their_own_list() -> None:
    cache = AssignmentCache(10, ttl_s=30.0, clock=ManualClock())
    cache.put("demo", "u1", answer())
    found = cache.get("demo", "u1")
    assert found is not None
    found.clear()
    assert variants(cache.get("demo", "u1")) == ["wide"]
