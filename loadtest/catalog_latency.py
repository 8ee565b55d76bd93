"""How fast the live catalog follows its writes, through the whole mesh as processes.

Starts the mesh (its own Redis, free ports; ``loadtest.harness``) on an artifact set and
measures, writing through the gateway's public API:

* **upsert to servable**: items upserted one per ``PUT /v1/items`` at ``--rate`` per
  second while an observer asks retrieval (``Retrieve``, so that it logs no impressions)
  for a user nobody has (popular, trending and fresh candidates, ``fresh_k`` 100) back to
  back; an item's latency is from its ``PUT``'s 202 to the first answer that shows it (the
  fresh source holds the tenant's newest own items);
* **delete to gone**: the set's most popular items (in every such answer) deleted one by
  one; a delete's latency is from its 202 to the first answer without it, and the
  answers after that are checked never to show it again;
* **sustained upserts**: ``--bulk-s`` seconds of ``PUT /v1/items`` with 1,000 items each,
  two clients; the rate is the items written over the time until the last one is
  servable (accepted, logged, projected and embedded).

With ``--impressions R`` a background client posts R impressions per second (``POST
/v1/events``, batches of 500) to the same tenant for the whole run, so the projector's log
reader trails behind as under real traffic; catalog events are read from their own stream
(``services.projector.consumer``) and must not wait behind them. The impressions accepted
and the 429s met are reported.

The observer's answers come every ~10-30 ms, which bounds the resolution. Writes
``--out`` (Markdown) with the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core import keys
from core.artifacts import load_artifact_set, resolve_current
from loadtest.harness import QUIET_ENV, mesh_layout, prepare_artifacts, running_mesh, write_tenants
from mesh import redis as mesh_redis
from mesh.client import open_channel
from mesh.context import TENANT_KEY

KEY = "demo-key"
IMPRESSION_BATCH = 500
OBSERVER = "catalog-latency-observer"


class Observer:
    """Asks retrieval for a user nobody has, back to back (popular, trending and fresh
    candidates: no impressions logged), and records when each item was first shown and
    every answer (wall seconds: compared with the projector's Redis clock)."""

    def __init__(self, retrieval: str, tenant: str) -> None:
        self._retrieval = retrieval
        self._tenant = tenant
        self.first: dict[str, float] = {}
        self.answers: list[tuple[float, set[str]]] = []
        self._stop = False

    async def run(self) -> None:
        async with open_channel(self._retrieval) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            while not self._stop:
                reply = await stub.Retrieve(
                    retrieval_pb2.RetrieveRequest(user_id=OBSERVER, fresh_k=100),
                    metadata=[(TENANT_KEY, self._tenant)],
                    timeout=5.0,
                )
                now = time.time()
                shown = {reply.names.get(i, str(i)) for i in reply.candidates.item_ids}
                self.answers.append((now, shown))
                for ref in shown:
                    self.first.setdefault(ref, now)

    def stop(self) -> None:
        self._stop = True


async def put(session: aiohttp.ClientSession, url: str, items: list[dict[str, Any]]) -> int:
    """``PUT /v1/items``, again after ``Retry-After`` while the gateway answers 429 (its
    outbox is full: the log takes the writes slower than they come); the 429s met."""
    refused = 0
    while True:
        async with session.put(
            f"{url}/v1/items", json={"items": items}, headers={"x-api-key": KEY}
        ) as response:
            if response.status == 202:
                return refused
            if response.status != 429:
                raise RuntimeError(f"PUT /v1/items: {response.status} {await response.text()}")
            refused += 1
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


class Impressions:
    """Posts ``rate`` impressions per second (batches of :data:`IMPRESSION_BATCH`) until
    stopped; counts what was accepted and refused."""

    def __init__(self, session: aiohttp.ClientSession, url: str, rate: float) -> None:
        self._session = session
        self._url = url
        self._rate = rate
        self.accepted = 0
        self.refused = 0
        self._stop = False

    async def run(self) -> None:
        if self._rate <= 0:
            return
        run = uuid.uuid4().hex[:6]
        started = time.monotonic()
        sent = 0
        while not self._stop:
            due = (time.monotonic() - started) * self._rate
            if sent >= due:
                await asyncio.sleep(IMPRESSION_BATCH / self._rate / 4)
                continue
            now_ms = int(time.time() * 1000)
            events = [
                {
                    "event_id": f"imp-{run}-{sent + i}",
                    "type": "impression",
                    "user_id": f"load-{(sent + i) % 5000}",
                    "item_id": str((sent + i) % 20_000),
                    "request_id": f"load-{run}-{(sent + i) // 10}",
                    "ts": now_ms,
                }
                for i in range(IMPRESSION_BATCH)
            ]
            async with self._session.post(
                f"{self._url}/v1/events", json={"events": events}, headers={"x-api-key": KEY}
            ) as response:
                if response.status == 202:
                    self.accepted += len(events)
                else:
                    self.refused += len(events)
            sent += IMPRESSION_BATCH

    def stop(self) -> None:
        self._stop = True


def _item(ref: str, rows: np.ndarray, categories: np.ndarray, n: int) -> dict[str, Any]:
    row = n % rows.shape[0]
    return {"item_id": ref, "category": int(categories[row]), "features": rows[row].tolist()}


async def applied_at(
    redis_url: str, sent: dict[str, float], deleted: dict[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """When the projector applied each write (wall seconds): its item's score in the tenant's
    item changes (Redis's clock, this machine's), the upserts' read through the id map."""
    client = mesh_redis.client(redis_url)
    try:
        refs = list(sent)
        internal = await client.hmget(keys.item_ids("demo"), refs) if refs else []
        upserts = {}
        for ref, number in zip(refs, internal, strict=True):
            score = await client.zscore(keys.item_changes("demo"), number) if number else None
            if score is not None:
                upserts[ref] = score / 1000
        deletes = {}
        for ref in deleted:
            score = await client.zscore(keys.item_changes("demo"), ref)
            if score is not None:
                deletes[ref] = score / 1000
        return upserts, deletes
    finally:
        await client.aclose()


def _after(later: dict[str, float], earlier: dict[str, float]) -> np.ndarray:
    return np.asarray([later[r] - earlier[r] for r in later if r in earlier]) * 1000


async def measure(
    url: str,
    retrieval: str,
    redis_url: str,
    rows: np.ndarray,
    categories: np.ndarray,
    args: Any,
) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        observer = Observer(retrieval, "demo")
        watching = asyncio.create_task(observer.run())
        impressions = Impressions(session, url, args.impressions)
        loading = asyncio.create_task(impressions.run())
        impressions_started = time.monotonic()
        await asyncio.sleep(2.0)  # the catalog of the tenant is loaded, answers flow
        sent: dict[str, float] = {}
        run = uuid.uuid4().hex[:6]
        for n in range(int(args.rate * args.seconds)):
            ref = f"lat-{run}-{n}"
            await put(session, url, [_item(ref, rows, categories, n)])
            sent[ref] = time.time()
            await asyncio.sleep(1.0 / args.rate)
        await asyncio.sleep(2.0)
        upsert = [observer.first[r] - t for r, t in sent.items() if r in observer.first]
        missed = len(sent) - len(upsert)

        # Deletes: the set's items every answer of the observer shows.
        shown_always = set.intersection(*(s for _, s in observer.answers[-20:]))
        popular = [r for r in shown_always if r.isdigit()][: args.deletes]
        deleted: dict[str, float] = {}
        for ref in popular:
            async with session.delete(
                f"{url}/v1/items/{ref}", headers={"x-api-key": KEY}
            ) as response:
                assert response.status == 202, await response.text()
            deleted[ref] = time.time()
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        gone: list[float] = []
        reappeared = 0
        for ref, at in deleted.items():
            after = [(t, ref in s) for t, s in observer.answers if t > at]
            first_gone = next((t for t, present in after if not present), None)
            if first_gone is not None:
                gone.append(first_gone - at)
                reappeared += sum(1 for t, present in after if t > first_gone and present)

        # Sustained upserts: batches of 1,000 from two clients for bulk_s seconds.
        bulk_run = uuid.uuid4().hex[:6]
        written = refused = 0
        newest: dict[int, str] = {}
        started = time.monotonic()

        async def writer(client: int) -> None:
            nonlocal written, refused
            batch = 0
            while time.monotonic() - started < args.bulk_s:
                items = [
                    _item(f"bulk-{bulk_run}-{client}-{batch}-{i}", rows, categories, i)
                    for i in range(1000)
                ]
                refused += await put(session, url, items)
                written += len(items)
                newest[0] = items[-1]["item_id"]  # of the PUT that returned last
                batch += 1

        await asyncio.gather(writer(0), writer(1))
        accepted_s = time.monotonic() - started
        started_wall = time.time() - accepted_s
        deadline = time.monotonic() + 120
        servable_s = None
        while time.monotonic() < deadline:
            # The last item of the PUT that returned last: the newest in the log (the fresh
            # source shows the newest first); once it is servable, so is every other.
            if all(ref in observer.first for ref in newest.values()):
                servable_s = max(observer.first[ref] for ref in newest.values()) - started_wall
                break
            await asyncio.sleep(0.05)
        observer.stop()
        impressions.stop()
        await watching
        await loading
        impressions_s = time.monotonic() - impressions_started
        applied_upsert, applied_delete = await applied_at(redis_url, sent, deleted)
    return {
        "upsert_applied_ms": _after(applied_upsert, sent),
        "delete_applied_ms": _after(applied_delete, deleted),
        "deletes_never_gone": len(deleted) - len(gone),
        "impressions_per_s": impressions.accepted / impressions_s,
        "impressions_refused": impressions.refused,
        "upsert_ms": np.asarray(upsert) * 1000,
        "upsert_missed": missed,
        "upserts": len(sent),
        "delete_ms": np.asarray(gone) * 1000,
        "deletes": len(deleted),
        "reappeared": reappeared,
        "bulk_items": written,
        "bulk_refused": refused,
        "bulk_accepted_s": accepted_s,
        "bulk_servable_s": servable_s,
        "answers": len(observer.answers),
    }


def _pcts(values: np.ndarray) -> str:
    if values.size == 0:
        return "none"
    p50, p99, top = np.percentile(values, [50, 99, 100])
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {top:.0f} ms (n={values.size})"


def render(result: dict[str, Any], command: str) -> str:
    bulk = result["bulk_items"]
    servable = result["bulk_servable_s"]
    rate = f"{bulk / servable:.0f} items/s" if servable else "not servable within 120 s"
    return "\n".join(
        [
            "# Live catalog: write to served",
            "",
            f"Command: `{command}`",
            "",
            "| figure | value |",
            "|---|---|",
            f"| upsert → servable ({result['upserts']} single-item PUTs) | "
            f"{_pcts(result['upsert_ms'])}; not seen: {result['upsert_missed']} |",
            f"| of which accepted → applied by the projector | "
            f"{_pcts(result['upsert_applied_ms'])} |",
            f"| delete → gone ({result['deletes']} set items) | {_pcts(result['delete_ms'])}; "
            f"never seen gone: {result['deletes_never_gone']}; "
            f"shown again after gone: {result['reappeared']} times |",
            f"| of which accepted → applied by the projector | "
            f"{_pcts(result['delete_applied_ms'])} |",
            f"| sustained upserts (2 clients, 1,000 items per PUT) | {bulk} items accepted in "
            f"{result['bulk_accepted_s']:.1f} s ({bulk / result['bulk_accepted_s']:.0f}/s); "
            f"last servable after {servable or float('nan'):.1f} s: {rate}; "
            f"429s (outbox full, retried after Retry-After): {result['bulk_refused']} |",
            f"| observer answers | {result['answers']} |",
            f"| background impressions accepted | {result['impressions_per_s']:.0f}/s; "
            f"refused: {result['impressions_refused']} |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.catalog_latency", description=__doc__)
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="artifact root (default: a small set trained for the run)",
    )
    parser.add_argument("--rate", type=float, default=10.0, help="single-item upserts per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--deletes", type=int, default=20)
    parser.add_argument("--bulk-s", type=float, default=10.0)
    parser.add_argument(
        "--impressions", type=float, default=0.0, help="background impressions per second"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench/catalog_latency.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="catalog-latency-") as tmp:
        base = Path(tmp)
        artifacts = prepare_artifacts(args.artifacts, base, items=20_000, users=5_000)
        loaded = load_artifact_set(resolve_current(artifacts))
        rows = np.asarray(loaded.open_array("item_features"))
        categories = np.asarray(loaded.open_array("item_categories"))
        tenants = write_tenants(base / "tenants.json", {"demo": KEY})
        # Plaintext, so that the observer may call retrieval directly with a tenant
        # (docs/security.md: with TLS only the gateway's identity may).
        layout = replace(mesh_layout(base, artifacts, tenants, QUIET_ENV), tls=False)
        with running_mesh(layout) as target:
            retrieval = f"127.0.0.1:{layout.ports['retrieval']}"
            redis_url = f"redis://127.0.0.1:{layout.redis_port}"
            result = asyncio.run(
                measure(target.http_url, retrieval, redis_url, rows, categories, args)
            )
    command = "python -m loadtest.catalog_latency " + shlex.join(argv or sys.argv[1:])
    text = render(result, command)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
