"""The projection rules in Python: what a tenant's log makes of its projections.

The projector applies these rules to the stream in Redis (one Lua call per batch,
``services.projector.projections``); this module applies the same rules to events in
memory, for what runs over the log in one pass: the batch recompute that checks the
stream (``recmesh projections verify``), snapshots and rebuilds, a user's features as of a
past time, and training sets built from the log. One event, in log order:

1. It is applied once per event id, and only when valid as of its append time
   (:func:`core.events.validate_event`); an invalid one is a dead letter.
2. Its time counts as no later than its append time (a client clock running fast cannot
   freeze an item's decay).
3. A click or a conversion appends its item to the user's recent outcomes (newest last,
   capped) and counts one for the item's category in the user's category shares (an item
   without a feature row has no category and counts in no share).
4. An impression, a click or a conversion adds to the item's counter of its kind, with
   exponential decay in event time: the counter holds ``v = sum(exp(-(at - t_i) / tau))``
   as of ``at``, the latest event time it saw, so the value depends on which events were
   applied and not on their order.
5. The item's place in the trending set is its click counter's :func:`trending_score`.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from recmesh.events.v1 import events_pb2

from core.events import validate_event
from mesh.errors import InvalidArgument

COUNTED = ("impression", "click", "conversion")
"""Event types the item counters count."""

OUTCOMES = ("click", "conversion")
"""Event types appended to the user's recent outcomes and counted in its category shares."""

TRENDING_KIND = "click"
"""The counter that orders the trending set."""

EPOCH_MS = 1_700_000_000_000
"""Origin of trending scores (2023-11-14), so ``(at - EPOCH_MS) / tau`` stays small and
precise in a double."""


def tau_ms(half_life_s: float) -> float:
    """The decay's time constant in ms for a half-life in seconds."""
    return half_life_s * 1000.0 / math.log(2)


def trending_score(value: float, at_ms: int, tau: float) -> float:
    """``ln(value) + (at - EPOCH_MS) / tau``: the log of the counter decayed to the common
    origin. Of two items the one with the higher score has the higher decayed count at any
    time, so one sorted set ranks them without ever rewriting a score."""
    return math.log(value) + (at_ms - EPOCH_MS) / tau


def counter_fields(kinds: Mapping[str, tuple[float, int]]) -> list[str]:
    """An item's counters (kind -> (value, at)) as the hash fields the projector's Lua
    writes (``<kind>`` as ``%.17g``, ``<kind>_at`` in integer ms): every writer of
    ``core.keys.item_counters`` in Python uses it, so a read gives back the same doubles."""
    fields: list[str] = []
    for kind, (value, at) in sorted(kinds.items()):
        fields += [kind, f"{value:.17g}", f"{kind}_at", str(int(at))]
    return fields


def decayed(value: float, at_ms: int, now_ms: int, tau: float) -> float:
    """A counter stored as ``value`` as of ``at_ms``, decayed to ``now_ms`` (a counter is
    never read as of a time before its own, which would grow it)."""
    return value * math.exp(min(0.0, (at_ms - now_ms) / tau))


Stored = tuple[str, events_pb2.Event | None]
"""A log entry: its position and event (None when it is not a valid ``Event``)."""


def decode_event(payload: bytes | None) -> events_pb2.Event | None:
    """The ``Event`` serialized in ``payload`` (a log entry's ``e`` field), None when it
    is missing or does not parse."""
    if payload is None:
        return None
    try:
        return events_pb2.Event.FromString(payload)
    except DecodeError:
        return None


def stored_entry(position: bytes | str, fields: Mapping[bytes, bytes]) -> Stored:
    """A stream entry as Redis returns it (position, fields), decoded: the event is the
    ``e`` field (see ``core.keys.events``), None when it does not parse."""
    position = position.decode() if isinstance(position, bytes) else position
    return position, decode_event(fields.get(b"e", b""))


def appended_ms(position: str) -> int:
    """The append time (ms) a stream position starts with."""
    return int(position.split("-", 1)[0])


@dataclass
class Projected:
    """A tenant's projections (or a part of them) as the rules compute them."""

    outcomes: dict[str, list[int]] = field(default_factory=dict)
    """User -> projected clicks and conversions, newest last (capped)."""
    shares: dict[str, dict[int, int]] = field(default_factory=dict)
    """User -> category -> clicks and conversions."""
    counters: dict[int, dict[str, tuple[float, int]]] = field(default_factory=dict)
    """Item -> kind -> (decayed count as of ``at``, ``at`` in ms)."""
    position: str = ""
    """The last log position applied ("" when none)."""

    def trending(self, tau: float) -> dict[int, float]:
        """Item -> trending score, for the items clicked."""
        return {
            item: trending_score(value, at, tau)
            for item, kinds in self.counters.items()
            if (found := kinds.get(TRENDING_KIND)) is not None
            for value, at in [found]
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (:meth:`from_json` reads it back)."""
        return {
            "position": self.position,
            "outcomes": self.outcomes,
            "shares": {user: {str(c): n for c, n in s.items()} for user, s in self.shares.items()},
            "counters": {
                str(item): {kind: [value, at] for kind, (value, at) in kinds.items()}
                for item, kinds in self.counters.items()
            },
        }

    def to_bytes(self) -> bytes:
        """The stored form of a snapshot: zlib-compressed JSON."""
        return zlib.compress(json.dumps(self.to_json(), separators=(",", ":")).encode(), 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> Projected:
        """Read :meth:`to_bytes` back."""
        return cls.from_json(json.loads(zlib.decompress(data)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Projected:
        return cls(
            outcomes={user: list(items) for user, items in data["outcomes"].items()},
            shares={
                user: {int(c): int(n) for c, n in s.items()} for user, s in data["shares"].items()
            },
            counters={
                int(item): {kind: (float(v), int(at)) for kind, (v, at) in kinds.items()}
                for item, kinds in data["counters"].items()
            },
            position=str(data["position"]),
        )


class Replay:
    """Applies events to a :class:`Projected` by the rules of the module docstring.

    Args:
        half_life_s: half-life of the item counters' decay; None keeps no counters (for
            a reader of users' outcomes and shares only: as-of reads, training sets).
        history_cap: outcomes kept per user.
        categories: item -> category, for the category shares (an item missing from it
            counts in no share).
        start: projections to continue from (a snapshot; copied, never changed); a fresh
            state when None.
    """

    def __init__(
        self,
        half_life_s: float | None,
        history_cap: int,
        categories: Mapping[int, int],
        start: Projected | None = None,
    ) -> None:
        self.state = copy.deepcopy(start) if start is not None else Projected()
        self.tau = tau_ms(half_life_s) if half_life_s is not None else None
        self._cap = history_cap
        self._categories = categories
        self._seen: set[str] = set()

    def apply(self, position: str, event: events_pb2.Event | None) -> bool:
        """Apply the entry at ``position`` (``None``: not a valid ``Event``); returns
        whether it changed anything (False for a dead letter or an id applied before)."""
        self.state.position = position
        if event is None or event.event_id in self._seen:
            return False
        appended = appended_ms(position)
        try:
            validate_event(event, 0, appended)
        except InvalidArgument:
            return False
        self._seen.add(event.event_id)
        ts = min(event.ts_ms, appended)
        if event.type in OUTCOMES:
            recent = self.state.outcomes.setdefault(event.user_id, [])
            recent.append(event.item_id)
            del recent[: -self._cap]
            category = self._categories.get(event.item_id)
            if category is not None:
                shares = self.state.shares.setdefault(event.user_id, {})
                shares[category] = shares.get(category, 0) + 1
        if event.type in COUNTED and self.tau is not None:
            kinds = self.state.counters.setdefault(event.item_id, {})
            found = kinds.get(event.type)
            if found is None:
                kinds[event.type] = (1.0, ts)
            elif ts >= found[1]:
                kinds[event.type] = (found[0] * math.exp((found[1] - ts) / self.tau) + 1.0, ts)
            else:
                kinds[event.type] = (found[0] + math.exp((ts - found[1]) / self.tau), found[1])
        return True

    def apply_all(self, stored: Iterable[tuple[str, events_pb2.Event | None]]) -> Projected:
        """Apply ``stored`` (log position, event or None) in order; returns the state."""
        for position, event in stored:
            self.apply(position, event)
        return self.state


def category_shares(counts: Mapping[int, int]) -> dict[int, float]:
    """Category -> share of the user's outcomes (empty when it has none)."""
    total = sum(counts.values())
    return {category: n / total for category, n in counts.items()} if total else {}
