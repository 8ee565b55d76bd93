"""The ranker's training set built from a tenant's event log (torch-free).

One example per logged impression, in log order (:func:`build_examples`):

* **Labels** join by request and item: the impression of item ``i`` in answer ``r`` is
  labelled clicked when the log holds a click naming ``r`` and ``i``, and clicked and
  converted when it holds such a conversion (a conversion implies the click, as in the
  ranker's heads), wherever that outcome is in the log. An outcome that names no logged
  impression labels nothing (counted in ``unmatched_outcomes``), nor does one without a
  request, and an impression without a request has no outcome.
* **History as of the impression.** One pass over the log in order with
  :class:`core.replay.Replay`, the projector's rules: an example's history is the user's
  projected outcomes (clicks and conversions, newest last, capped) right after the
  impression's entry was applied, so nothing appended later is in it, whatever the events'
  own ``ts_ms`` say. One exception keeps the answer's own outcomes out: an outcome naming
  the impression's request that was appended before the impression (impressions that
  waited in the gateway's outbox) is removed from its history (its last occurrence), since
  the answer was served before it happened.
* **Dense features** come from an artifact set (the one that served, or the base of the
  new set): ``user_rows`` index its ``user_features`` (``u<row>``; -1 for a user the set
  does not know, who is served the set's default row, the mean row); an impression of an
  item outside the set's items is skipped (``unknown_items``).
* Each example keeps the logged ``propensity`` (for inverse-propensity weighting), its
  ``source``, its slot in the answer, and its log position and append time (lineage); an
  answer's ``support`` (on its first impression, ``core.explore``) is kept per request.

Events are applied once per event id and only when valid as of their append time (the
replay's rules): a duplicate impression or outcome is neither an example nor a label.

:func:`read_examples` reads the log from Redis with ``XRANGE`` (:func:`read_log`), from its
first entry; once retention trimmed it, from the snapshot taken before the trim and the
entries after it (only those are examples; the histories keep the trimmed outcomes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from numpy.typing import NDArray

from core import keys
from core.replay import OUTCOMES, Projected, Replay, Stored, appended_ms, stored_entry
from mesh.redis import BlockingRedis

LABELS = ("click", "conversion")
"""Label columns: clicked, and clicked and converted (the ranker's head order)."""


_USER_ROW = re.compile(r"u(0|[1-9][0-9]*)")
_CLICK, _CONVERSION = 1, 2


def read_log(
    client: BlockingRedis, tenant: str, after: str = "", page: int = 1000
) -> Iterator[Stored]:
    """The entries of ``tenant``'s log (``core.keys.events``) after position ``after``
    ("": all), in order, read with ``XRANGE`` ``page`` entries at a time; an entry whose
    ``e`` field does not parse as an ``Event`` comes as None."""
    start = f"({after}" if after else "-"
    while True:
        chunk = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            client.xrange(keys.events(tenant), min=start, max="+", count=page),
        )
        yield from (stored_entry(position, fields) for position, fields in chunk)
        if len(chunk) < page:
            return
        start = f"({chunk[-1][0].decode()}"


def user_row(user_id: str, n_users: int) -> int:
    """The row of ``user_id`` in a set's ``user_features`` (ids are ``u<row>``, as the
    feature store materialises them), or -1 for a user the set does not know."""
    match = _USER_ROW.fullmatch(user_id)
    row = int(match.group(1)) if match else -1
    return row if row < n_users else -1


class ItemCategories(Mapping[int, int]):
    """Item id -> category over a set's ``item_categories`` array (ids outside it absent)."""

    def __init__(self, categories: NDArray[np.integer]) -> None:
        self._categories = categories

    def __getitem__(self, item: int) -> int:
        if not 0 <= item < self._categories.shape[0]:
            raise KeyError(item)
        return int(self._categories[item])

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._categories.shape[0]))

    def __len__(self) -> int:
        return int(self._categories.shape[0])


@dataclass(frozen=True)
class LogCounts:
    """What a pass over a log found."""

    entries: int
    """Log entries read."""
    not_applied: int
    """Entries the replay did not apply: not an ``Event``, invalid, or a repeated id."""
    impressions: int
    """Impressions applied (examples plus ``unknown_items``)."""
    unknown_items: int
    """Impressions skipped: their item is outside the artifact set."""
    unknown_users: int
    """Examples whose user the set does not know (they get its default row)."""
    outcomes: int
    """Clicks and conversions applied."""
    unmatched_outcomes: int
    """Outcomes naming no logged impression (no request, another item, an unknown request)."""
    outcomes_before_impression: int
    """Outcomes appended before the impression of their request and item (kept out of
    that impression's history, still its label)."""
    first_position: str
    last_position: str
    snapshot_position: str
    """The snapshot the pass continued from ("" when it read the log from its start)."""


@dataclass(frozen=True)
class LogExamples:
    """Aligned per-example arrays, in log order (see the module docstring)."""

    tenant: str
    log_positions: list[str]
    appended_ms: NDArray[np.int64]
    request_ids: list[str]
    user_ids: list[str]
    user_rows: NDArray[np.int64]
    """Row in the set's ``user_features``; -1: unknown user (default row)."""
    items: NDArray[np.int64]
    labels: NDArray[np.float32]
    """``[M, 2]`` 0/1 in :data:`LABELS` order."""
    propensities: NDArray[np.float64]
    sources: NDArray[np.int32]
    """``recmesh.common.v1.Source`` values."""
    slots: NDArray[np.int32]
    """The item's position in its answer."""
    history_indptr: NDArray[np.int64]
    history_items: NDArray[np.int64]
    """Example ``k``'s as-of history is ``history_items[indptr[k]:indptr[k + 1]]``."""
    counts: LogCounts
    supports: dict[str, NDArray[np.int64]] = field(default_factory=dict)
    """Request -> the answer's logged support (every item it could have shown), for the
    answers whose impressions carry one."""

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def history(self, k: int) -> list[int]:
        """Example ``k``'s history as of its impression, oldest first."""
        start, stop = self.history_indptr[k], self.history_indptr[k + 1]
        return [int(i) for i in self.history_items[start:stop]]

    def heldout_start(self, share: float) -> int:
        """The first example of the latest ``share`` of the log's examples (by log order),
        moved back to the start of its answer so no answer is split; the examples before it
        train, those from it on are held out. 0 < ``share`` < 1."""
        if not 0.0 < share < 1.0:
            raise ValueError("the held-out share must be in (0, 1)")
        cut = min(len(self), max(1, round(len(self) * (1.0 - share))))
        while 0 < cut < len(self) and self.request_ids[cut - 1] == self.request_ids[cut]:
            cut -= 1
        return cut

    def digest(self) -> str:
        """sha256 over every example's log position, item and labels: names the data."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.log_positions).encode())
        digest.update(self.items.tobytes())
        digest.update(self.labels.tobytes())
        return digest.hexdigest()


def trimmed_start(client: BlockingRedis, tenant: str) -> Projected | None:
    """Where a pass over ``tenant``'s log must start: None (from its first entry) unless
    retention trimmed it (the snapshot, ``core.keys.snapshot``, says ``trimmed_to``); then
    the snapshot's projections, to continue after its position, so the users' histories
    keep the outcomes of the entries trimmed away."""
    state, trimmed_to = cast(
        list[bytes | None], client.hmget(keys.snapshot(tenant), ["state", "trimmed_to"])
    )
    if state is None or not trimmed_to:
        return None
    return Projected.from_bytes(state)


def read_examples(
    client: BlockingRedis,
    tenant: str,
    *,
    n_users: int,
    item_categories: NDArray[np.integer],
    history_cap: int,
) -> LogExamples:
    """:func:`build_examples` over ``tenant``'s log in Redis, from its first entry, or,
    once retention trimmed it, from its snapshot (:func:`trimmed_start`): the examples are
    then the impressions after the snapshot's position."""
    start = trimmed_start(client, tenant)
    return build_examples(
        read_log(client, tenant, after=start.position if start is not None else ""),
        tenant=tenant,
        n_users=n_users,
        item_categories=item_categories,
        history_cap=history_cap,
        start=start,
    )


def build_examples(
    entries: Iterable[Stored],
    *,
    tenant: str,
    n_users: int,
    item_categories: NDArray[np.integer],
    history_cap: int,
    start: Projected | None = None,
) -> LogExamples:
    """The examples of a log (``entries`` in log order), for an artifact set with
    ``n_users`` users and ``item_categories`` (one per item). ``history_cap`` is the
    projector's (``RECMESH_FEATURE_HISTORY_CAP``), so a history is what the feature store
    served at the time. ``start``: the projections of the entries before ``entries`` (a
    snapshot), None for a log read from its first entry."""
    n_items = int(item_categories.shape[0])
    snapshot = start.position if start is not None else ""
    replay = Replay(None, history_cap, ItemCategories(item_categories), start)
    outcomes: dict[tuple[str, int], int] = {}  # (request, item) -> label flags
    per_pair: dict[tuple[str, int], int] = {}  # (request, item) -> outcome events
    by_request: dict[str, list[int]] = {}  # request -> items of its outcomes applied so far
    positions: list[str] = []
    appended: list[int] = []
    requests: list[str] = []
    user_ids: list[str] = []
    rows: list[int] = []
    items: list[int] = []
    propensities: list[float] = []
    sources: list[int] = []
    slots: list[int] = []
    histories: list[list[int]] = []
    supports: dict[str, NDArray[np.int64]] = {}
    entries_read = not_applied = impressions = unknown_items = n_outcomes = unnamed = 0
    early_outcomes = 0
    first = last = ""
    for position, event in entries:
        entries_read += 1
        first = first or position
        last = position
        if event is None or not replay.apply(position, event):
            not_applied += 1
            continue
        if event.type in OUTCOMES:
            n_outcomes += 1
            if not event.request_id:  # joins no impression
                unnamed += 1
                continue
            flag = _CONVERSION if event.type == "conversion" else _CLICK
            key = (event.request_id, event.item_id)
            outcomes[key] = outcomes.get(key, 0) | flag
            per_pair[key] = per_pair.get(key, 0) + 1
            by_request.setdefault(event.request_id, []).append(event.item_id)
            continue
        if event.type != "impression":
            continue
        impressions += 1
        if event.support and event.request_id:
            supports[event.request_id] = np.array(event.support, dtype=np.int64)
        if not event.item_id < n_items:
            unknown_items += 1
            continue
        history = list(replay.state.outcomes.get(event.user_id, ()))
        before = by_request.get(event.request_id, [])
        for item in before:
            _remove_last(history, item)
        early_outcomes += before.count(event.item_id)
        positions.append(position)
        appended.append(appended_ms(position))
        requests.append(event.request_id)
        user_ids.append(event.user_id)
        rows.append(user_row(event.user_id, n_users))
        items.append(event.item_id)
        propensities.append(event.propensity)
        sources.append(int(event.source))
        slots.append(event.position)
        histories.append(history)
    flags = np.array(
        [outcomes.get((r, i), 0) if r else 0 for r, i in zip(requests, items, strict=True)],
        dtype=np.int64,
    )
    labels = np.stack([flags != 0, (flags & _CONVERSION) != 0], axis=1).astype(np.float32)
    shown = set(zip(requests, items, strict=True))
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    user_rows = np.array(rows, dtype=np.int64)
    return LogExamples(
        tenant=tenant,
        log_positions=positions,
        appended_ms=np.array(appended, dtype=np.int64),
        request_ids=requests,
        user_ids=user_ids,
        user_rows=user_rows,
        items=np.array(items, dtype=np.int64),
        labels=labels.reshape(-1, len(LABELS)),
        propensities=np.array(propensities, dtype=np.float64),
        sources=np.array(sources, dtype=np.int32),
        slots=np.array(slots, dtype=np.int32),
        history_indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        history_items=np.array([i for h in histories for i in h], dtype=np.int64),
        counts=LogCounts(
            entries=entries_read,
            not_applied=not_applied,
            impressions=impressions,
            unknown_items=unknown_items,
            unknown_users=int((user_rows < 0).sum()),
            outcomes=n_outcomes,
            unmatched_outcomes=unnamed + sum(n for k, n in per_pair.items() if k not in shown),
            outcomes_before_impression=early_outcomes,
            first_position=first,
            last_position=last,
            snapshot_position=snapshot,
        ),
        supports=supports,
    )


def _remove_last(history: list[int], item: int) -> None:
    for k in range(len(history) - 1, -1, -1):
        if history[k] == item:
            del history[k]
            return
