"""``python -m loadtest.click_lag``: how long a click takes to reach the user's features.

Starts the mesh as processes (its own Valkey, free ports; :mod:`loadtest.harness`), then
per rate of ``--rates`` posts events to ``POST /v1/events`` for ``--seconds`` (100 posts a
second, ``rate / 100`` events each; ``--click-share`` of them clicks, each by a user of its
own, the rest impressions). A click is *visible* once the projector has appended its item
to that user's projected outcomes in Valkey (``core.keys.outcomes``), which the feature
store serves as the newest of the user's history and retrieval's seen filter reads. For
every click it reports the time from the gateway's 202 to visible: the outbox, the relay,
the events service, the log and the projector, end to end. Clicks not visible 5 s after
the last post are counted apart.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from core import keys
from loadtest.harness import mesh_layout, prepare_artifacts, running_mesh, write_tenants
from loadtest.reporting import percentile, table
from loadtest.runs import add_run_options, run_directory
from mesh import redis as mesh_redis

TENANT = "bench"
POSTS_PER_S = 100
SETTLE_S = 5.0


@dataclass
class Clicks:
    """Clicks sent and not yet seen (user -> item, accepted at), and the delays seen."""

    pending: dict[str, tuple[int, float]] = field(default_factory=dict)
    delays_ms: list[float] = field(default_factory=list)


async def send(
    url: str, key: str, rate: float, seconds: float, share: float, clicks: Clicks
) -> int:
    """Post ``rate`` events a second for ``seconds``; returns the events accepted."""
    rng = random.Random(0)
    per_post = max(1, round(rate / POSTS_PER_S))
    accepted = 0
    started = time.monotonic()
    async with aiohttp.ClientSession(headers={"x-api-key": key}) as session:
        for tick in range(int(seconds * POSTS_PER_S)):
            await asyncio.sleep(max(0.0, started + tick / POSTS_PER_S - time.monotonic()))
            batch: list[dict[str, Any]] = []
            for _ in range(per_post):
                click = rng.random() < share
                user = f"lag-{uuid.uuid4().hex[:12]}" if click else f"u{rng.randrange(1000)}"
                batch.append(
                    {
                        "event_id": uuid.uuid4().hex,
                        "type": "click" if click else "impression",
                        "user_id": user,
                        "item_id": str(rng.randrange(1000)),  # a set item, by its number
                        "ts": int(time.time() * 1000),
                    }
                )
            async with session.post(f"{url}/v1/events", json={"events": batch}) as response:
                if response.status != 202:
                    continue
            now = time.monotonic()
            accepted += len(batch)
            for event in batch:
                if event["type"] == "click":
                    # The outcomes hold internal ids: a set item's is its number.
                    clicks.pending[event["user_id"]] = (int(event["item_id"]), now)
    return accepted


async def watch(redis_url: str, clicks: Clicks, stop: asyncio.Event) -> None:
    """Every 5 ms, look whether pending clicks reached their user's history."""
    client = mesh_redis.client(redis_url)
    try:
        while not stop.is_set() or clicks.pending:
            users = list(clicks.pending)
            if users:
                async with client.pipeline(transaction=False) as pipe:
                    for user in users:
                        pipe.lrange(keys.outcomes(TENANT, user), -1, -1)
                    lasts = await pipe.execute()
                now = time.monotonic()
                for user, last in zip(users, lasts, strict=True):
                    item, sent = clicks.pending[user]
                    if last and int(last[0]) == item:
                        clicks.delays_ms.append((now - sent) * 1000)
                        del clicks.pending[user]
            await asyncio.sleep(0.005)
    finally:
        await client.aclose()


async def measure(
    url: str, key: str, redis_url: str, rate: float, args: argparse.Namespace
) -> list[object]:
    """One step: the row of the report."""
    clicks = Clicks()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(redis_url, clicks, stop))
    accepted = await send(url, key, rate, args.seconds, args.click_share, clicks)
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(watcher), SETTLE_S)
    except TimeoutError:
        watcher.cancel()
    delays = clicks.delays_ms
    cells = [percentile(delays, q) for q in (50, 95, 99)]
    return [
        f"{rate:g}",
        f"{accepted / args.seconds:.0f}",
        len(delays) + len(clicks.pending),
        *("—" if c is None else f"{c:.0f}" for c in cells),
        "—" if not delays else f"{max(delays):.0f}",
        len(clicks.pending),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.click_lag", description=__doc__)
    add_run_options(parser)
    parser.add_argument("--rates", default="100,1000", help="events/s per step")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of a step")
    parser.add_argument("--click-share", type=float, default=0.2, help="share of clicks")
    args = parser.parse_args(argv)
    key = "bench-" + uuid.uuid4().hex
    with run_directory("recmesh-click-lag-", args.keep) as base:
        artifacts = prepare_artifacts(args.artifacts, base, args.items, args.users)
        tenants = write_tenants(base / "tenants.json", {TENANT: key}, rate=10000, burst=20000)
        layout = mesh_layout(base, artifacts, tenants, {"RECMESH_LOG_LEVEL": "WARNING"})
        with running_mesh(layout) as target:
            rows = [
                asyncio.run(
                    measure(target.http_url, key, layout.effective_redis_url(), float(r), args)
                )
                for r in args.rates.split(",")
            ]
    header = [
        "events/s",
        "accepted/s",
        "clicks",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "not seen",
    ]
    print("\n".join(table(header, "rrrrrrrr", rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
