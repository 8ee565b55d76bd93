"""A steady stream of events through ``POST /v1/events``, as an application backend posts
them: the ingest of the chaos suite (:mod:`chaos.ingest`) and of the projector benchmark
(:mod:`loadtest.projector_bench`).

Open loop: post ``k`` starts ``k * batch / rate`` seconds after the first, whatever the
earlier ones take (each post is its own task, bounded by ``REQUEST_TIMEOUT_S``), so the
offered rate stays fixed while the gateway is slow or down. Each post carries ``batch``
events of one tenant: a ``click_share`` of clicks, the rest impressions, each with a fresh
(seeded) event id, a user of ``users`` and an item drawn uniformly from ``n_items`` (named,
as clients do, by its id string: the artifact set's item ``17`` is ``"17"``), and
the wall-clock time as ``ts``. The post's outcome is handed to ``on_post`` as a
:class:`Post`; its JSON form (:meth:`Post.record`) is the line ``chaos.ingest`` writes::

    {"k": "ing", "t": 1700000000.1, "ms": 4.2, "s": 202, "e": "", "ids": ["<id>", ...]}

(``t`` the wall-clock start, ``ms`` the latency, ``s`` the HTTP status, 0 when none came,
``e`` the error kind of :func:`loadtest.traffic.error_kind`, ``ids`` the event ids posted).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.traffic import CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, ZipfUsers, error_kind


@dataclass(frozen=True)
class Post:
    """One ``POST /v1/events`` and its outcome."""

    t: float
    ms: float
    status: int
    error: str
    ids: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Accepted: the gateway answered 202, so every event of it must reach the log."""
        return not self.error and self.status == 202

    def record(self) -> dict[str, Any]:
        """The JSON line of the module docstring."""
        return {
            "k": "ing",
            "t": round(self.t, 4),
            "ms": round(self.ms, 2),
            "s": self.status,
            "e": self.error,
            "ids": list(self.ids),
        }

    @classmethod
    def parse(cls, record: dict[str, Any]) -> Post:
        """Read :meth:`record` back."""
        return cls(
            float(record["t"]),
            float(record["ms"]),
            int(record["s"]),
            str(record.get("e", "")),
            tuple(str(i) for i in record.get("ids", ())),
        )


def event_batch(
    rng: random.Random, size: int, click_share: float, users: ZipfUsers, n_items: int, ts_ms: int
) -> list[dict[str, Any]]:
    """``size`` events as ``POST /v1/events`` takes them (see the module docstring)."""
    return [
        {
            "event_id": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
            "type": "click" if rng.random() < click_share else "impression",
            "user_id": users.draw(rng),
            "item_id": str(rng.randrange(n_items)),  # a set item, named by its number
            "ts": ts_ms,
        }
        for _ in range(size)
    ]


def session(api_key: str) -> aiohttp.ClientSession:
    """An HTTP session for ``api_key``'s posts, with the load tests' client-side limits."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    return aiohttp.ClientSession(headers={"x-api-key": api_key}, timeout=timeout)


async def post(client: aiohttp.ClientSession, url: str, events: list[dict[str, Any]]) -> Post:
    """Post ``events`` to ``url``'s ``/v1/events``; failures come back in the
    :class:`Post`, never raised."""
    started, clock = time.time(), time.perf_counter()
    try:
        async with client.post(f"{url}/v1/events", json={"events": events}) as response:
            await response.read()
            status, error = response.status, error_kind(None, response.status)
    except aiohttp.ClientConnectorError as exc:
        status, error = 0, error_kind(exc.os_error, 0)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        status, error = 0, error_kind(exc, 0)
    ms = (time.perf_counter() - clock) * 1000.0
    return Post(started, ms, status, error, tuple(e["event_id"] for e in events))


async def post_steadily(
    url: str,
    api_key: str,
    *,
    rate: float,
    batch: int,
    click_share: float,
    users: ZipfUsers,
    n_items: int,
    on_post: Callable[[Post], None],
    duration_s: float,
    stop: Callable[[], bool] = lambda: False,
    seed: int = 0,
) -> None:
    """Post ``rate`` events a second in posts of ``batch`` to ``url`` for ``duration_s``
    seconds or until ``stop()`` is true (checked before each post); returns once every
    post started has its outcome. The event ids come from a random stream of their own
    (seeded with ``"ingest:<seed>"``), apart from the seeded streams of the locust users'
    clicks."""
    rng = random.Random(f"ingest:{seed}")
    interval = batch / rate
    tasks: set[asyncio.Task[None]] = set()
    async with session(api_key) as client:

        async def one(events: list[dict[str, Any]]) -> None:
            on_post(await post(client, url, events))

        first = time.monotonic()
        k = 0
        while time.monotonic() - first < duration_s and not stop():
            await asyncio.sleep(max(0.0, first + k * interval - time.monotonic()))
            events = event_batch(rng, batch, click_share, users, n_items, int(time.time() * 1000))
            task = asyncio.create_task(one(events))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.gather(*tasks)
