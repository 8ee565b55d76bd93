"""``python -m loadtest.redis_bytes``: bytes per key of a tenant's Redis data (docs/scaling.md).

Starts its own embedded Valkey (:func:`ops.redis_server.start_embedded_redis`, in a
temporary directory) and writes one tenant's data with the services' own code:

* the feature views, as the feature service's materialisation writes them (its steps, from
  the arrays of ``--artifacts``: user rows and histories, item rows);
* ``--events`` realistic events (answers of ten impressions with their lineage, a click on a
  fifth of them, a conversion on a tenth of the clicks: ``loadtest.projector_bench``)
  through the events service's append (``RedisStreamEventLog``);
* the projections of those events, through the projector's own reader and Lua
  (``StreamProjector.read_once``).

After each step it prints ``INFO memory`` ``used_memory`` grown per user, item or event,
and ``MEMORY USAGE <key> SAMPLES 0`` of up to 500 keys of each kind (mean and median). The
whole run takes a few seconds on the repository's default set (5,000 users, 20,000 items).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import redis
from recmesh.events.v1 import events_pb2

from core import keys
from loadtest.projector_bench import realistic
from loadtest.traffic import ZipfUsers
from mesh.ports import free_port
from mesh.redis import blocking_client, connect
from ops.redis_server import start_embedded_redis, stop_processes
from services.events.log import RedisStreamEventLog
from services.feature.store import RedisFeatureStore
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections

TENANT = "demo"
WEEK_S = 7 * 24 * 3600


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def key_sizes(r: redis.Redis, pattern: str, limit: int = 500) -> str:
    """``MEMORY USAGE`` of up to ``limit`` keys matching ``pattern``: count, mean, median."""
    names: list[bytes] = []
    for name in r.scan_iter(match=pattern, count=1000):
        names.append(name)
        if len(names) >= limit:
            break
    sizes = [int(r.memory_usage(name, samples=0) or 0) for name in names]
    if not sizes:
        return "no key"
    return (
        f"{len(sizes)} keys, MEMORY USAGE mean {statistics.mean(sizes):.0f} B, "
        f"median {statistics.median(sizes):.0f} B"
    )


async def measure(url: str, artifacts: Path, events: int) -> None:
    r = redis.Redis.from_url(url)  # one server: the measuring connection
    client = connect(url)
    print(f"valkey {r.info('server').get('valkey_version', '?')}")
    store = RedisFeatureStore(client, history_cap=200, bulk=blocking_client(url))
    users = np.load(artifacts / "user_features.npy", mmap_mode="r")
    items = np.load(artifacts / "item_features.npy", mmap_mode="r")
    categories = np.load(artifacts / "item_categories.npy")
    history = np.load(artifacts / "user_history.npz")
    indptr, history_items = history["indptr"], history["items"]
    start = used_memory(r)
    await store.set_views(
        TENANT,
        version="redis-bytes",
        user_default=np.asarray(users.mean(axis=0), dtype=np.float32),
        item_default=np.asarray(items.mean(axis=0), dtype=np.float32),
        users=users.shape[0],
        items=items.shape[0],
    )
    for first in range(0, users.shape[0], 1000):
        last = min(first + 1000, users.shape[0])
        await store.write_users(
            TENANT,
            [f"u{row}" for row in range(first, last)],
            np.asarray(users[first:last], dtype=np.float32),
            [history_items[indptr[row] : indptr[row + 1]].tolist() for row in range(first, last)],
        )
    after_users = used_memory(r)
    await store.load_items(TENANT, items, categories)
    after_items = used_memory(r)
    print(
        f"feature views: {users.shape[0]} users ({users.shape[1]} features, histories of "
        f"{np.diff(indptr).mean():.1f} items on average): used_memory "
        f"+{(after_users - start) / users.shape[0]:.0f} B/user; {items.shape[0]} items "
        f"({items.shape[1]} features): +{(after_items - after_users) / items.shape[0]:.0f} B/item"
    )
    for what, pattern in (("user row", "u"), ("history", "h"), ("item row", "i")):
        print(f"  {what} rm:{{t}}:{pattern}:*: {key_sizes(r, f'rm:{{{TENANT}}}:{pattern}:*')}")

    log = RedisStreamEventLog(client, WEEK_S)
    await log.prepare()
    rng = random.Random(0)
    who, what_item = ZipfUsers(users.shape[0], 0.8, 0), ZipfUsers(items.shape[0], 0.8, 1)
    appended, answers = 0, 0
    pending: list[events_pb2.Event] = []
    before = used_memory(r)
    while appended + len(pending) < events:
        pending += realistic(rng, who, what_item)
        answers += 1
        if len(pending) >= 500:
            appended += (await log.append(TENANT, pending)).appended
            pending = []
    if pending:
        appended += (await log.append(TENANT, pending)).appended
    grown = used_memory(r) - before
    stream = int(r.memory_usage(keys.events(TENANT), samples=0) or 0)
    print(
        f"event log: {appended} events ({answers} answers): used_memory "
        f"+{grown / appended:.0f} B/event; the stream {stream / appended:.0f} B/entry"
    )
    for what, pattern in (
        ("dedupe claim", "eid"),
        ("request index", "rq"),
        ("user index", "ue"),
    ):
        print(f"  {what} rm:{{t}}:{pattern}:*: {key_sizes(r, f'rm:{{{TENANT}}}:{pattern}:*')}")

    projections = Projections(client, history_cap=200, half_life_s=3600.0, applied_ttl_s=WEEK_S)
    await projections.prepare()
    projector = StreamProjector(
        client, projections, [TENANT], group="projector", consumer="redis-bytes", batch=500
    )
    await projector.prepare()
    before, applied = used_memory(r), 0
    while (handled := await projector.read_once()) > 0:
        applied += handled
    print(
        f"projections: {applied} events applied: used_memory "
        f"+{(used_memory(r) - before) / max(applied, 1):.0f} B/event"
    )
    for what, pattern in (
        ("applied mark", "pj"),
        ("item counters", "ic"),
        ("outcomes", "o"),
        ("category shares", "uc"),
    ):
        print(f"  {what} rm:{{t}}:{pattern}:*: {key_sizes(r, f'rm:{{{TENANT}}}:{pattern}:*')}")
    trending = keys.trending(TENANT)
    print(
        f"  trending: {r.zcard(trending)} items, MEMORY USAGE "
        f"{r.memory_usage(trending, samples=0)} B"
    )
    await client.aclose()
    r.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.redis_bytes", description=__doc__)
    parser.add_argument(
        "--artifacts", type=Path, default=Path("artifacts/current"), help="an artifact set"
    )
    parser.add_argument("--events", type=int, default=50_000, help="events to append")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rm-bytes-") as tmp:
        port = free_port()
        server = start_embedded_redis(Path(tmp) / "data", port, Path(tmp) / "valkey.log")
        try:
            asyncio.run(measure(f"redis://127.0.0.1:{port}/0", args.artifacts, args.events))
        finally:
            stop_processes([server])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
