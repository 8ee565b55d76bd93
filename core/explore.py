"""Exploration slots with known propensities, for inverse-propensity weighting.

The policy, for ``n`` slots and an exploration share ``s``:

* ``k = floor(n·s + ½)`` slots explore (at most ``n`` and at most the pool size);
* the first ``n - k`` items of the exploit order are shown — propensity 1;
* the ``k`` explore items are drawn uniformly without replacement from the *pool*: the
  first ``pool_size`` candidates after the exploit items, in the cascade's order. Each
  pool item is shown with probability ``k / M`` (``M`` the pool's size), which is the
  propensity returned for the ones drawn;
* explore items go to slots drawn uniformly among all but the first (the top slot
  stays exploit while any slot does), the exploit items keep their order around them.

So over every candidate the probabilities of being shown sum to ``n - k + M · k/M = n``.
The generator is seeded from the request id, so a request's list can be reproduced.

The candidates with a positive probability, the shown exploit items then the pool, are the
answer's **support** (:attr:`Slate.support`). The ranking service returns it with the answer
and the gateway logs it on the answer's first impression, so that off-policy evaluation
(:mod:`training.ope`) can compute what another final stage would have shown from the same
candidates. The rules live here, below both, so the serve and the estimate cannot differ.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

DEFAULT_SHARE = 0.0
"""Share of slots that explore when nothing configures it (``RECMESH_RANKING_EXPLORE_SHARE``)."""
DEFAULT_POOL = 100
"""Pool exploration draws from when nothing configures it (``RECMESH_RANKING_EXPLORE_POOL``)."""


@dataclass(frozen=True)
class Slate:
    """The shown list: candidate positions, propensities, and which slots explore; and
    the support: every position the policy could have shown, in ``order``'s order (the
    ``n - k`` shown exploit items, then the pool; ``n`` positions when nothing explores)."""

    positions: I64
    propensities: F64
    explored: npt.NDArray[np.bool_]
    support: I64


def explore_slots(n: int, share: float, pool_size: int) -> int:
    """How many of ``n`` slots explore, for ``share`` and a pool of ``pool_size``."""
    if n <= 0 or share <= 0 or pool_size <= 0:
        return 0
    return min(n, pool_size, int(np.floor(n * share + 0.5)))


def rng_for(request_id: str, tenant: str) -> np.random.Generator:
    """The exploration generator of one request: seeded by tenant and request id."""
    if not request_id:
        return np.random.default_rng()
    digest = hashlib.blake2b(f"{tenant}\0{request_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def build_slate(
    order: I64, n: int, share: float, pool_size: int, rng: np.random.Generator
) -> Slate:
    """The ``n`` shown positions: ``order``'s head with ``k`` slots drawn from the pool.

    Args:
        order: every eligible candidate position, in the cascade's final order.
        n: slots to fill.
        share: share of slots that explore.
        pool_size: candidates after the shown exploit items that exploration draws from.
        rng: the request's generator.
    """
    n = min(n, order.size)
    k = explore_slots(n, share, pool_size) if order.size > n else 0
    if k == 0:
        return Slate(order[:n].copy(), np.ones(n), np.zeros(n, dtype=bool), order[:n].copy())
    shown_exploit = order[: n - k]
    pool = order[n - k : n - k + pool_size]
    drawn = rng.choice(pool.size, size=k, replace=False)
    first = 1 if k < n else 0
    slots = rng.choice(np.arange(first, n), size=k, replace=False)
    explored = np.zeros(n, dtype=bool)
    explored[slots] = True
    positions = np.empty(n, dtype=np.int64)
    positions[explored] = pool[drawn]
    positions[~explored] = shown_exploit
    propensities = np.ones(n)
    propensities[explored] = k / pool.size
    return Slate(positions, propensities, explored, order[: n - k + pool.size].copy())


def reserve_pool(
    order: I64,
    n: int,
    share: float,
    pool_size: int,
    favoured: npt.NDArray[np.bool_],
    favoured_share: float,
) -> I64:
    """``order`` with up to ``round(favoured_share · M)`` favoured candidates (``M`` the
    pool's size) moved, in their order, to the head of the exploration pool: cold start,
    new items given a share of the exploration draws. The exploit head is unchanged and
    every pool item keeps the propensity ``k / M``, so :func:`build_slate` on the result
    logs exact propensities and its support says what the pool held.

    Args:
        order: candidate positions in the cascade's final order.
        favoured: by candidate position, whether it is favoured (a fresh item).
        favoured_share: share of the pool reserved for favoured candidates, in [0, 1].
    """
    n = min(n, order.size)
    k = explore_slots(n, share, pool_size) if order.size > n else 0
    if k == 0 or favoured_share <= 0:
        return order
    head, tail = order[: n - k], order[n - k :]
    wanted = int(np.floor(favoured_share * min(pool_size, tail.size) + 0.5))
    chosen = tail[favoured[tail]][:wanted]
    if chosen.size == 0:
        return order
    return np.concatenate([head, chosen, tail[~np.isin(tail, chosen)]])


def inclusion_probabilities(order_size: int, n: int, share: float, pool_size: int) -> F64:
    """Probability of each position of ``order`` (by index) of being shown by the policy."""
    n = min(n, order_size)
    k = explore_slots(n, share, pool_size) if order_size > n else 0
    probabilities = np.zeros(order_size)
    probabilities[: n - k] = 1.0
    if k:
        pool = probabilities[n - k : n - k + pool_size]
        pool[:] = k / pool.size
    return probabilities
