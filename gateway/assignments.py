"""The gateway's cache of the experiment service's answers.

Assignment is a pure function of the experiment book, the tenant and the request's
attributes (``core.experiments.assign.assign``), and the gateway sends only the user
id, so an answer of the experiment service for one (tenant, user) stays right for as long
as the service serves the same book. The service remains the owner of assignment: the
cache holds only its answers, never computes one, and never holds the gateway's own control
fallback.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from recmesh.experiment.v1 import experiment_pb2


@dataclass(frozen=True)
class _Entry:
    stored_at: float
    assignments: tuple[experiment_pb2.Assignment, ...]


class AssignmentCache:
    """The experiment service's answers by (tenant, user id), bounded in age and in number.

    Contract:

    - :meth:`get` returns the assignments of an answer stored at most ``ttl_s`` seconds
      before (by ``clock``), else None. Within that time the experiment service is not asked
      again, so a new book reaches a cached user ``ttl_s`` seconds late at worst.
    - :meth:`put` stores an answer. An answer whose ``book_version`` differs from that of
      the answers held empties the cache first, so the answers held always come from one
      book: the one of the latest answer (during a rollout, replicas serving the old and
      new books make the cache flip between them; it settles when the rollout ends). An
      answer without a ``book_version`` (a service older than the field) is not stored,
      since a change of book could not be noticed.
    - At most ``max_entries`` answers are held; storing one more evicts the least recently
      used one (stored or returned by :meth:`get`).
    - ``ttl_s <= 0`` or ``max_entries <= 0`` turns the cache off: nothing is stored and
      :meth:`get` always returns None.

    Only answers of the service may be stored: a failed call, and the control variants the
    gateway applies while the service is down, never are (so that the service is asked
    again on the next request). Meant for one event loop; not thread-safe.

    Args:
        max_entries: how many (tenant, user) answers to hold.
        ttl_s: how long an answer is served, in seconds.
        clock: monotonic clock in seconds (tests inject one).
    """

    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._version = ""

    @property
    def version(self) -> str:
        """The book version of every answer held ("" before the first): the one of the
        latest answer stored, since an answer of another book empties the cache."""
        return self._version

    def get(self, tenant: str, user_id: str) -> list[experiment_pb2.Assignment] | None:
        """The assignments of the answer stored for ``(tenant, user_id)`` at most ``ttl_s``
        seconds ago, or None. The messages are shared with later hits: do not modify them."""
        key = (tenant, user_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.stored_at > self._ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return list(entry.assignments)

    def put(self, tenant: str, user_id: str, reply: experiment_pb2.AssignResponse) -> None:
        """Store the experiment service's ``reply`` for ``(tenant, user_id)`` (see the class
        docstring for when it empties the cache, evicts, or stores nothing)."""
        if self._ttl_s <= 0 or self._max_entries <= 0 or not reply.book_version:
            return
        if reply.book_version != self._version:
            self._entries.clear()
            self._version = reply.book_version
        key = (tenant, user_id)
        self._entries[key] = _Entry(self._clock(), tuple(reply.assignments))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
