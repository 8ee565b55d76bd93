"""``python -m loadtest.item_counters``: what reading the item counters costs.

Ranking's re-rank reads the decayed counters of its pool each request
(``GetItemFeatures`` with ``counter_item_ids``: one ``EVAL`` in the feature service, see
:mod:`services.feature.counters`). This micro-benchmark starts its own embedded Valkey,
writes counters for a third of ``--items`` items (as the projector would), and times, for
each batch size of ``--sizes``:

* ``valkey_ms``: the server's time per ``EVAL`` (``INFO commandstats``);
* ``eval_ms``: the feature store's read, one ``EVAL`` and the numpy decay, in this process;
* ``hmget_ms``: the same read as pipelined ``HMGET`` decoded in Python, for comparison;
* ``grpc_ms``: a whole ``GetItemFeatures`` call to a feature server in this process (the
  client's and the server's work on one event loop, plus the loopback): what ranking's
  background fetch (:class:`services.ranking.counters.CounterCache`) costs per call;
* ``lookup_ms``: what a ranking request pays instead, a lookup of counters the cache holds.

Each figure is the mean over ``--calls`` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core import keys
from core.replay import decayed, tau_ms
from mesh import redis as mesh_redis
from mesh.client import Downstream
from mesh.context import tenant_var
from mesh.ports import free_port
from mesh.redis import AsyncRedis
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from ops.redis_server import start_embedded_redis
from services.feature.counters import FIELDS
from services.feature.server import build_service
from services.feature.settings import FeatureSettings
from services.feature.store import RedisFeatureStore
from services.ranking.counters import CounterCache

TENANT = "bench"
HALF_LIFE_S = 3600.0


async def mean_ms(call: Callable[[], Awaitable[object]], calls: int) -> float:
    for _ in range(10):
        await call()
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls * 1000


async def fill(client: AsyncRedis, items: int) -> None:
    now = int(time.time() * 1000)
    async with client.pipeline(transaction=False) as pipe:
        for item in range(0, items, 3):
            pipe.hset(
                keys.item_counters(TENANT, item),
                mapping={
                    "impression": random.random() * 50,
                    "impression_at": now - 1000,
                    "click": random.random() * 5,
                    "click_at": now - 5000,
                },
            )
        await pipe.execute()


async def measure(url: str, items: int, sizes: Sequence[int], calls: int) -> list[str]:
    client = mesh_redis.client(url)
    await fill(client, items)
    store = RedisFeatureStore(client, half_life_s=HALF_LIFE_S)
    tau = tau_ms(HALF_LIFE_S)
    settings = FeatureSettings(port=0, redis_url=url, drain_delay_s=0, half_life_s=HALF_LIFE_S)
    lines = [
        "| items | valkey_ms | eval_ms | hmget_ms | grpc_ms | lookup_ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    async with (
        serving(await built_server(build_service, settings)) as server,
        channel_to(server) as channel,
    ):
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        held = CounterCache(
            Downstream("feature", stub),
            refresh_s=3600.0,
            max_age_s=3600.0,
            max_entries=items,
            batch=items,
        )
        tenant_var.set(TENANT)
        for size in sizes:
            ids = random.sample(range(items), size)
            names = [keys.item_counters(TENANT, i) for i in ids]

            async def by_eval(ids: list[int] = ids) -> object:
                return await store.get_items(TENANT, [], ids)

            async def by_hmget(names: list[str] = names) -> object:
                now = int(time.time() * 1000)
                async with client.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.hmget(name, *FIELDS)
                    replies = await pipe.execute()
                return [
                    [
                        decayed(float(v[2 * k]), int(v[2 * k + 1]), now, tau)
                        if v[2 * k] is not None
                        else 0.0
                        for k in range(3)
                    ]
                    for v in replies
                ]

            async def by_grpc(ids: list[int] = ids) -> object:
                return await stub.GetItemFeatures(
                    feature_pb2.GetItemFeaturesRequest(counter_item_ids=ids),
                    metadata=tenant_metadata(TENANT),
                )

            await client.config_resetstat()
            eval_ms = await mean_ms(by_eval, calls)
            stats = await client.info("commandstats")
            valkey_ms = stats["cmdstat_eval"]["usec_per_call"] / 1000
            hmget_ms = await mean_ms(by_hmget, calls)
            grpc_ms = await mean_ms(by_grpc, calls)
            pool = np.asarray(ids, dtype=np.int64)
            held.lookup(TENANT, pool)
            await held.idle()

            async def by_lookup(pool: npt.NDArray[np.int64] = pool) -> object:
                return held.lookup(TENANT, pool)

            lookup_ms = await mean_ms(by_lookup, calls)
            lines.append(
                f"| {size} | {valkey_ms:.3f} | {eval_ms:.3f} | {hmget_ms:.3f} | {grpc_ms:.3f} "
                f"| {lookup_ms:.3f} |"
            )
    await client.aclose()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.item_counters", description=__doc__)
    parser.add_argument("--items", type=int, default=20_000, help="items in the catalogue")
    parser.add_argument("--sizes", default="50,200,600", help="items per read, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per figure")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if not all(0 < s <= args.items for s in sizes) or args.calls < 1:
        parser.error("every size must be in 1..--items, and --calls at least 1")
    with tempfile.TemporaryDirectory() as base:
        port = free_port()
        process = start_embedded_redis(Path(base) / "data", port, Path(base) / "log")
        try:
            url = f"redis://127.0.0.1:{port}/0"
            lines = asyncio.run(measure(url, args.items, sizes, args.calls))
        finally:
            process.terminate()
            process.wait()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
