"""Watching the mesh while it is broken: ``/metrics`` scrapes, health checks, the event
log's consumer group, event read-back and the projections' check.

:class:`Observer` runs three background threads: one scrapes the gateway's ``/metrics``
twice a second into :class:`~chaos.timeline.Sample`, one asks every process for its
``grpc.health.v1`` status once a second (Redis: PING), one reads the projector's consumer
group on the tenant's log from Redis twice a second (:class:`~chaos.timeline.GroupSample`).
:func:`read_events` reads a tenant's whole event log back through ``EventService.Read``;
:func:`check_projections` waits for the projector to catch up and compares its
projections with a recount from the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from chaos.timeline import GroupSample, HealthSample, ProjectorCheck, Sample
from core import keys
from core.logread import as_text
from mesh import redis as mesh_redis
from mesh.context import TENANT_KEY
from mesh.redis import BlockingRedis
from mesh.tls import Transport
from ops import processes, supervisor
from services.projector import batch
from services.projector.settings import ProjectorSettings

RECOMMEND_ROUTE = "/v1/recommend"


def parse_metrics(text: str, t: float, load1: float = 0.0) -> Sample:
    """The figures the suite needs from one Prometheus text exposition of the gateway."""
    breaker: dict[str, float] = {}
    opened: dict[str, float] = {}
    attempts: dict[str, float] = {}
    retries: dict[str, float] = {}
    rejected: dict[str, float] = {}
    buckets: dict[str, float] = {}
    requests = outbox = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, float(sample.value)
            ds = labels.get("downstream", "")
            if sample.name == "recmesh_breaker_state":
                breaker[ds] = value
            elif sample.name == "recmesh_breaker_transitions_total" and labels["state"] == "open":
                opened[ds] = value
            elif sample.name == "recmesh_downstream_attempts_total":
                attempts[ds] = attempts.get(ds, 0.0) + value
            elif sample.name == "recmesh_downstream_retries_total":
                retries[ds] = value
            elif sample.name == "recmesh_downstream_rejected_total":
                rejected[ds] = rejected.get(ds, 0.0) + value
            elif sample.name == "recmesh_gateway_requests_total" and (
                labels.get("route") == RECOMMEND_ROUTE and labels.get("api") == "http"
            ):
                requests += value
            elif sample.name == "recmesh_gateway_outbox_depth":
                outbox = value
            elif sample.name == "recmesh_gateway_request_seconds_bucket" and (
                labels.get("route") == RECOMMEND_ROUTE and labels.get("api") == "http"
            ):
                buckets[labels["le"]] = value
    return Sample(
        t,
        True,
        breaker,
        opened,
        attempts,
        retries,
        rejected,
        requests,
        outbox,
        load1,
        latency_buckets=buckets,
    )


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """The host's busy CPU time since boot, all CPUs (``/proc/stat``).

    Busy is user + nice + system + irq + softirq + steal: time the hypervisor gave to
    other machines counts as taken from this one.
    """
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) for v in stat.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _redis_status(url: str) -> str:
    client = mesh_redis.blocking_client(url, socket_connect_timeout=0.3, socket_timeout=0.3)
    try:
        client.ping()
        return "SERVING"
    except redis.RedisError:
        return "UNREACHABLE"
    finally:
        client.close()


def group_state(client: BlockingRedis, stream: str, group: str, t: float) -> GroupSample:
    """``group``'s state on ``stream`` now (``up`` False when Redis did not answer; lag and
    pending None while the group does not exist)."""
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            length, groups = pipe.execute()
    except redis.ResponseError:  # no such stream yet
        return GroupSample(t, True, length=0)
    except (redis.RedisError, OSError):
        return GroupSample(t, False)
    info: dict[str, Any] | None = next((g for g in groups if as_text(g["name"]) == group), None)
    if info is None:
        return GroupSample(t, True, length=int(length))
    lag = info.get("lag")
    return GroupSample(
        t,
        True,
        lag=None if lag is None else int(lag),
        pending=int(info["pending"]),
        length=int(length),
    )


class Observer:
    """Background scrapes of one mesh; read ``samples``, ``health`` and ``group`` at any
    time. ``tenant`` and ``group`` name the log and the projector's consumer group watched."""

    def __init__(
        self,
        layout: supervisor.Layout,
        tenant: str,
        group: str,
        scrape_s: float = 0.5,
        health_s: float = 1.0,
    ) -> None:
        self._layout = layout
        self._url = f"http://127.0.0.1:{layout.http_port}/metrics"
        self._scrape_s = scrape_s
        self._health_s = health_s
        self._stream = keys.events(tenant)
        self._group = group
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="chaos-health")
        self.samples: list[Sample] = []
        self.health: list[HealthSample] = []
        self.group: list[GroupSample] = []
        self.extra_pids: list[int] = [os.getpid()]
        self._cpu_seen: dict[int, float] = {}
        self._cpu_ours = 0.0
        self._threads = [
            threading.Thread(target=self._scrape_loop, name="chaos-scrape", daemon=True),
            threading.Thread(target=self._health_loop, name="chaos-health", daemon=True),
            threading.Thread(target=self._group_loop, name="chaos-group", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._pool.shutdown(wait=True)

    def _our_pids(self) -> list[int]:
        """The run's helpers and every live process of its mesh."""
        found = (
            processes.running_pid(self._layout.run_dir, name)
            for name in (*processes.MODULES, processes.REDIS)
        )
        return [*self.extra_pids, *(pid for pid in found if pid is not None)]

    def _cpu(self) -> tuple[float, float]:
        """Host busy CPU seconds and the cumulative share of this run's processes."""
        first = not self._cpu_seen
        for pid in self._our_pids():
            now = process_cpu_s(pid)
            if now is None:
                continue
            # A pid first seen after the start is a restarted process: count it from zero.
            before = self._cpu_seen.get(pid, now if first else 0.0)
            self._cpu_ours += max(0.0, now - before)
            self._cpu_seen[pid] = now
        return busy_cpu_s(), self._cpu_ours

    def scrape(self) -> Sample:
        """One scrape now (``up`` False when the gateway did not answer)."""
        now = time.time()
        load1 = os.getloadavg()[0]
        busy, ours = self._cpu()
        try:
            with urllib.request.urlopen(self._url, timeout=1.0) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError, TimeoutError):
            return Sample(now, False, load1=load1, cpu_busy_s=busy, cpu_ours_s=ours)
        sample = parse_metrics(text, now, load1)
        return dataclasses.replace(sample, cpu_busy_s=busy, cpu_ours_s=ours)

    def check_health(self) -> HealthSample:
        """Every process's health status now."""
        now = time.time()
        names = [*self._layout.ports]
        transport = self._layout.transport()
        futures = {
            name: self._pool.submit(supervisor.health_status, self._layout.ports[name], transport)
            for name in names
        }
        redis_status = self._pool.submit(_redis_status, self._layout.effective_redis_url())
        status = {name: future.result() for name, future in futures.items()}
        status["redis"] = redis_status.result()
        return HealthSample(now, status)

    def _scrape_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.samples.append(self.scrape())
            self._stop.wait(max(0.0, self._scrape_s - (time.monotonic() - started)))

    def _health_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.health.append(self.check_health())
            self._stop.wait(max(0.0, self._health_s - (time.monotonic() - started)))

    def _group_loop(self) -> None:
        client = mesh_redis.blocking_client(
            self._layout.effective_redis_url(), socket_connect_timeout=0.3, socket_timeout=0.3
        )
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self.group.append(group_state(client, self._stream, self._group, time.time()))
                self._stop.wait(max(0.0, self._scrape_s - (time.monotonic() - started)))
        finally:
            client.close()

    def latest(self) -> tuple[Sample | None, HealthSample | None]:
        """The most recent answered scrape and health check."""
        sample = next((s for s in reversed(self.samples) if s.up), None)
        return sample, (self.health[-1] if self.health else None)


def read_events(
    port: int, tenant: str, transport: Transport, page: int = 1000
) -> Iterable[events_pb2.Event]:
    """Every event in ``tenant``'s log, in order, read through ``EventService.Read`` over
    ``transport`` (the tools' identity may name tenants to the events service)."""
    with transport.sync_channel(f"127.0.0.1:{port}", server="events") as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        after = ""
        while True:
            reply = stub.Read(
                events_pb2.ReadRequest(after=after, limit=page),
                metadata=((TENANT_KEY, tenant),),
                timeout=10,
            )
            if not reply.events:
                return
            for stored in reply.events:
                yield stored.event
            after = reply.events[-1].position


def check_projections(
    url: str, tenant: str, settings: ProjectorSettings, timeout_s: float, shown: int = 20
) -> ProjectorCheck:
    """Wait (at most ``timeout_s``) until the projector's group has read and acknowledged
    every entry of ``tenant``'s log, then compare the live projections with a recount from
    the log (``services.projector.batch.verify``, with the projector's half-life and
    history cap). Call it once nothing is appended any more: the load stopped and the
    outbox drained. The differences are kept as counted, and the first ``shown`` as worded.
    """
    stream = keys.events(tenant)
    client = mesh_redis.blocking_client(url, socket_connect_timeout=1.0, socket_timeout=5.0)
    started = time.monotonic()
    try:
        while True:
            state = group_state(client, stream, settings.group, time.time())
            caught_up = state.up and state.lag == 0 and state.pending == 0
            if caught_up or time.monotonic() - started > timeout_s:
                break
            time.sleep(0.5)
    finally:
        client.close()
    waited = time.monotonic() - started
    entries = state.length or 0
    if not caught_up:
        return ProjectorCheck(False, waited, state.lag, state.pending, entries, 0)

    async def verify() -> list[str]:
        async_client = mesh_redis.client(url)
        try:
            found = await batch.verify(
                async_client, [tenant], settings.half_life_s, settings.history_cap
            )
        finally:
            await async_client.aclose()
        return found[tenant]

    differences = asyncio.run(verify())
    return ProjectorCheck(
        True, waited, state.lag, state.pending, entries, len(differences), differences[:shown]
    )
