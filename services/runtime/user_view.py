"""The user feature view, read straight from the online store: one pipelined round trip.

The feature service owns the store (its key layout, materialisation, the streaming
writes, as-of reads, the ``FeatureService`` API); this module is the one reader of a
user's live row that the feature service and retrieval share. Retrieval reads the user
here, in its own process, instead of calling ``GetUserFeatures`` on the request path: the
Feast pattern of an online-serving SDK over the feature server's store, which takes one
RPC (both sides of it, and a process's turn on a core) off every recommendation
(``docs/performance.md``, issue 15's fourth round).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from core import keys
from core.replay import category_shares
from mesh.calls import call_timeout
from mesh.client import metered_breaker
from mesh.errors import DeadlineExceeded, FailedPrecondition, Unavailable, store_unavailable
from mesh.redis import AsyncRedis
from mesh.resilience import AsyncBreaker
from mesh.tracing import redis_span


@dataclass(frozen=True)
class UserFeatures:
    """One user's row; ``is_default`` when the user was unknown."""

    features: npt.NDArray[np.float32]
    history: list[int]
    is_default: bool
    category_shares: dict[int, float] = field(default_factory=dict)
    """Category -> share of the user's clicks and conversions (empty when none)."""


async def read_user(
    redis: AsyncRedis, tenant: str, user_id: str, history_limit: int
) -> UserFeatures:
    """``user_id``'s row (the view default when unknown), the last ``history_limit``
    entries of its history (the materialised history, then the outcomes the projector
    appended from the event log, the newest last) and its category shares, in one
    round trip (a ``redis GET+LRANGE+LRANGE+HGET+HGETALL`` CLIENT span).

    Raises:
        FailedPrecondition: nothing is materialised for ``tenant``.
        redis.RedisError: the store did not answer.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.user_row(tenant, user_id))
        pipe.lrange(keys.history(tenant, user_id), -history_limit, -1)
        pipe.lrange(keys.outcomes(tenant, user_id), -history_limit, -1)
        pipe.hget(keys.meta(tenant), "user_default")
        pipe.hgetall(keys.category_shares(tenant, user_id))
        with redis_span("GET+LRANGE+LRANGE+HGET+HGETALL", redis):
            row, history, outcomes, default, counts = await pipe.execute()
    if default is None:
        raise FailedPrecondition(f"no feature views are materialised for tenant {tenant!r}")
    is_default = row is None
    features = np.frombuffer(default if is_default else row, dtype="<f4")
    recent = [int(h) for h in (history + outcomes)[-history_limit:]]
    shares = category_shares({int(c): int(n) for c, n in counts.items()})
    return UserFeatures(features, recent, is_default, shares)


READ_FAILURES: tuple[type[Exception], ...] = (
    DeadlineExceeded,
    TimeoutError,
    Unavailable,
    FailedPrecondition,
)
"""What :meth:`UserViewReader.read` fails with: no time left, the cap spent, the store out
of reach or the breaker open (both ``Unavailable``), nothing materialised."""


class UserViewReader:
    """:func:`read_user` on a request's path, guarded as a downstream call is
    (:class:`mesh.client.Downstream`): each read waits at most ``cap_s`` and never past the
    request's remaining budget (:func:`mesh.calls.call_timeout`), behind a circuit breaker
    of its own (``feature-store``) that an unreachable or slow store opens, so that while
    it is open a request spends nothing on it. There is no retry: a second read cannot fit
    a budget the first one spent.

    Args:
        redis: the store's client (``mesh.redis.connect``).
        history_limit: history entries read per user.
        cap_s: most time one read may take.
        breaker: the guard (default: the mesh's call policy, named ``feature-store``).
    """

    def __init__(
        self,
        redis: AsyncRedis,
        *,
        history_limit: int,
        cap_s: float,
        breaker: AsyncBreaker | None = None,
    ) -> None:
        self._redis = redis
        self._history_limit = history_limit
        self._cap_s = cap_s
        self.breaker = breaker if breaker is not None else metered_breaker("feature-store")

    async def read(self, tenant: str, user_id: str) -> UserFeatures:
        """``user_id``'s features (:func:`read_user`).

        Raises:
            One of :data:`READ_FAILURES`.
        """
        timeout_s = call_timeout(self._cap_s)

        async def guarded() -> UserFeatures:
            try:
                async with asyncio.timeout(timeout_s):
                    return await read_user(self._redis, tenant, user_id, self._history_limit)
            except Exception as exc:
                if store_unavailable(exc):
                    raise Unavailable(f"feature store unreachable: {exc}") from exc
                raise

        return await self.breaker.call(guarded)
