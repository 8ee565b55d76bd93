"""The traffic model every load generator shares: who asks, for which tenant, when, and
what they click. Pure Python (no locust, no I/O but the files named), so it is unit-tested
without a load generator and imported by the locustfiles, the step benchmark and chaos.

* **Users** follow a Zipf law over the artifact set's user ids (``u{row}``): the user of
  popularity rank ``k`` (1-based) asks with probability proportional to ``1 / k**s``; ranks
  are spread over rows by a seeded permutation, so heavy users are not just ``u0, u1, ...``.
  ``s = 0`` is a uniform draw.
* **Tenants** are drawn by weight from a tenant key file (:func:`read_tenant_keys`).
* **Clicks**: after a recommendation that returned items, with probability
  ``click_share`` the user thinks for a while (uniform in ``think_s``) and clicks one of
  the returned items, chosen with a position bias (``1 / (position + 1)``).
* **Pace**: each simulated user starts its visits on a fixed grid (:class:`Pacer`), the
  users' grids evenly interleaved, so the arrival rate of recommendations is
  ``users * per_user_rate`` whatever the target does.

Every request becomes one JSON line (:class:`Recorder`)::

    {"k": "rec", "t": 1700000000.123, "ms": 23.4, "s": 200, "e": "", "u": 7, "tn": "demo",
     "d": ["ranking"], "r": "<request id>", "n": 10}
    {"k": "evt", "t": 1700000000.950, "ms": 4.1, "s": 202, "e": "", "u": 7, "tn": "demo",
     "id": "<event id>"}

``t`` is the wall-clock start, ``ms`` the latency, ``s`` the HTTP status (0 when none
arrived; gRPC answers record 200 for ``Recommend`` and 202 for ``LogEvents`` when OK),
``e`` the error kind (:func:`error_kind`; for gRPC the lower-case status code name), ``u``
the simulated user's number in its process, ``tn`` the tenant; a recommendation that
succeeded adds the stages that fell back (``d``), its request id (``r``) and the number
of items (``n``), a click its event id (``id``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PER_USER_RATE = 0.5
"""Default recommendations per second of one simulated user (a page view every 2 s)."""

ZIPF_EXPONENT = 0.8
"""Default Zipf exponent of user activity (1 is the classic law; 0 is uniform)."""

CLICK_SHARE = 0.2
"""Default share of recommendations followed by a click."""

THINK_S = (0.3, 1.2)
"""Default bounds of the think time before a click, seconds."""

CONNECT_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 2.0
"""Client-side limits of connecting and of one request (HTTP: of reading its answer once
connected); longer waits are recorded as ``timeout``."""

TENANT_KEYS_DEV = Path(__file__).resolve().parent / "tenants.dev.json"
"""Keys of the local development tenants (``config/tenants.dev.json`` stores their digests)."""


@dataclass(frozen=True)
class TenantKey:
    """A tenant the load acts for: its name, API key in clear and share of the traffic."""

    name: str
    api_key: str
    weight: float = 1.0


def read_tenant_keys(path: Path) -> list[TenantKey]:
    """Tenants of a key file ``{"tenants": {name: {"api_key": str, "weight": float}}}``.

    Raises:
        ValueError: no tenants, a missing key, or a weight that is not positive.
    """
    document = json.loads(path.read_text())
    tenants = [
        TenantKey(name, str(spec["api_key"]), float(spec.get("weight", 1.0)))
        for name, spec in document.get("tenants", {}).items()
    ]
    if not tenants:
        raise ValueError(f"tenant key file {path}: no tenants")
    for tenant in tenants:
        if not tenant.api_key or tenant.weight <= 0:
            raise ValueError(f"tenant key file {path}: {tenant.name} needs a key and weight > 0")
    return tenants


def write_tenant_keys(path: Path, tenants: Sequence[TenantKey]) -> Path:
    """Write ``tenants`` in the format :func:`read_tenant_keys` reads; returns ``path``."""
    document = {"tenants": {t.name: {"api_key": t.api_key, "weight": t.weight} for t in tenants}}
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


class ZipfUsers:
    """User ids drawn from a Zipf law of exponent ``exponent`` over ``n_users`` rows."""

    def __init__(
        self,
        n_users: int,
        exponent: float = ZIPF_EXPONENT,
        seed: int = 0,
        id_format: str = "u{row}",
    ) -> None:
        if n_users < 1:
            raise ValueError("n_users must be at least 1")
        if exponent < 0:
            raise ValueError("the Zipf exponent must not be negative")
        self.n_users = n_users
        self.exponent = exponent
        self.id_format = id_format
        weights = (math.pow(rank, -exponent) for rank in range(1, n_users + 1))
        self._cumulative = list(itertools.accumulate(weights))
        rows = list(range(n_users))
        random.Random(seed).shuffle(rows)
        self._row_of_rank = rows

    def row_of_rank(self, rank: int) -> int:
        """The row of the user with popularity ``rank`` (1 = the most active)."""
        return self._row_of_rank[rank - 1]

    def draw_row(self, rng: random.Random) -> int:
        """One user row."""
        point = rng.random() * self._cumulative[-1]
        rank = min(bisect.bisect_right(self._cumulative, point), self.n_users - 1) + 1
        return self._row_of_rank[rank - 1]

    def draw(self, rng: random.Random) -> str:
        """One user id."""
        return self.id_format.format(row=self.draw_row(rng))


@dataclass(frozen=True)
class Visit:
    """One recommendation a simulated user asks for."""

    tenant: TenantKey
    user_id: str
    num_items: int


@dataclass(frozen=True)
class TrafficModel:
    """Who asks, for which tenant, and what they click (see the module docstring)."""

    users: ZipfUsers
    tenants: tuple[TenantKey, ...]
    click_share: float = CLICK_SHARE
    think_s: tuple[float, float] = THINK_S
    num_items: int = 10

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("the traffic model needs at least one tenant")
        if not 0.0 <= self.click_share <= 1.0:
            raise ValueError("click_share must be within [0, 1]")
        if not 0.0 <= self.think_s[0] <= self.think_s[1]:
            raise ValueError("think_s must be (low, high) with 0 <= low <= high")

    def visit(self, rng: random.Random) -> Visit:
        """The next recommendation: a tenant by weight, a user by Zipf."""
        tenant = rng.choices(self.tenants, weights=[t.weight for t in self.tenants])[0]
        return Visit(tenant, self.users.draw(rng), self.num_items)

    def clicked(self, rng: random.Random, items: Sequence[str]) -> tuple[int, str] | None:
        """``(position, item_id)`` the user clicks among ``items`` (ranked, by the tenant's
        own ids), or None."""
        if not items or rng.random() >= self.click_share:
            return None
        weights = [1.0 / (position + 1) for position in range(len(items))]
        position = rng.choices(range(len(items)), weights=weights)[0]
        return position, items[position]

    def think(self, rng: random.Random) -> float:
        """Seconds between seeing the recommendations and clicking."""
        return rng.uniform(*self.think_s)


def click_event(
    rng: random.Random, user_id: str, item_id: str, request_id: str, position: int, ts_ms: int
) -> dict[str, Any]:
    """A click as ``POST /v1/events`` takes it (``item_id``: the tenant's own id, as the
    answer named it), with a fresh (seeded) event id."""
    return {
        "event_id": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
        "type": "click",
        "user_id": user_id,
        "item_id": item_id,
        "request_id": request_id,
        "position": position,
        "ts": ts_ms,
    }


def n_users_of(artifacts: Path) -> tuple[int, str]:
    """``(n_users, user id format)`` of the artifact set ``current`` points at under
    ``artifacts``.

    Raises:
        ArtifactError: no readable current artifact set.
    """
    from core.artifacts import load_artifact_set, resolve_current

    config = load_artifact_set(resolve_current(artifacts), verify=False).config
    return int(config["n_users"]), str(config.get("user_id_format", "u{row}"))


class Pacer:
    """Starts one user's visits on a fixed grid of ``period`` seconds.

    Slot ``slot`` of ``slots`` fires at clock times ``(slot / slots + k) * period``, so
    ``slots`` users with slots ``0 .. slots-1`` interleave evenly and together send
    ``slots / period`` requests per second. A visit that overran is followed at once by
    the one that fell due meanwhile: a stalled request delays only its own user, which
    then catches up, and the arrival rate holds whatever the target does.
    """

    def __init__(
        self,
        period: float,
        slot: int,
        slots: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if period <= 0 or slots < 1:
            raise ValueError("period must be positive and slots at least 1")
        self._period = period
        self._clock = clock
        offset = (slot % slots) / slots * period
        now = clock()
        turns = -((offset - now) // period)  # ceil((now - offset) / period)
        self._due = offset + turns * period

    def first_delay(self) -> float:
        """Seconds until the user's first visit (its first slot from now)."""
        return max(0.0, self._due - self._clock())

    def next_delay(self) -> float:
        """Seconds from now until the user's next visit (called after each visit)."""
        self._due += self._period
        return max(0.0, self._due - self._clock())


CLOSED_ERRORS = ("HTTPConnectionClosed", "EmptyResponse")
"""geventhttpclient's errors for a connection that closed before the answer."""


def error_kind(error: BaseException | None, status: int) -> str:
    """The error class recorded for one HTTP request (empty when it succeeded).

    ``refused`` (nothing listening), ``reset`` (connection closed under the request),
    ``timeout``, ``http`` (an error status) or ``other:<type>``. An error wrapping the one
    that happened (geventhttpclient's ``RetriesExceeded``, raised for a POST it may not
    retry, carries it as ``original``) is classified by what it wraps.
    """
    if error is None:
        return "" if 200 <= status < 300 else "http"
    original = getattr(error, "original", None)
    if isinstance(original, BaseException):
        return error_kind(original, status)
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, TimeoutError) or type(error).__name__ == "Timeout":
        return "timeout"
    if isinstance(error, ConnectionError) or type(error).__name__ in CLOSED_ERRORS:
        return "reset"
    if status >= 400:
        return "http"
    return f"other:{type(error).__name__}"


class Recorder:
    """Buffers request records and appends them to ``path`` as JSON lines, at most
    ``every_s`` after they were added (and on :meth:`flush`)."""

    def __init__(
        self, path: Path, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._path = path
        self._lines: list[str] = []
        self._every_s = every_s
        self._clock = clock
        self._flushed = clock()

    def add(self, record: dict[str, Any]) -> None:
        self._lines.append(json.dumps(record, separators=(",", ":")))
        if self._clock() - self._flushed >= self._every_s:
            self.flush()

    def flush(self) -> None:
        self._flushed = self._clock()
        if self._lines:
            lines, self._lines = self._lines, []
            with self._path.open("a") as out:
                out.write("\n".join(lines) + "\n")
