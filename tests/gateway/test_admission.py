"""Admission control: the adaptive in-flight limit, the loop-lag signal, and refusals
through the HTTP API (503 with Retry-After, counted, before any downstream work)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from gateway.admission import AdmissionConfig, AdmissionControl
from gateway.settings import GatewaySettings
from mesh.errors import ConfigError, Overloaded
from tests.inprocess import Mesh, inprocess_mesh, write_tenants


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shed(tenant: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "recmesh_gateway_shed_total", {"tenant": tenant, "reason": reason}
    )
    return value or 0.0


def block_the_loop(seconds: float) -> None:
    """Hold the event loop's thread, as a long synchronous piece of work does."""
    time.sleep(seconds)


def test_on_time_answers_raise_the_limit_by_one_per_round_when_it_is_used() -> None:
    control = AdmissionControl(AdmissionConfig(initial_limit=10, max_limit=100), Clock())
    control.in_flight = 1  # an idle gateway: its answers say nothing about the limit
    control.observe(0.010)
    assert control.limit == 10
    control.in_flight = 5  # half the limit in flight (the answer's own place included)
    for _ in range(10):  # one round of the limit's answers
        control.observe(0.010)
    assert control.limit == pytest.approx(11, abs=0.05)


def test_slow_answers_lower_the_limit_once_per_cooldown_within_bounds() -> None:
    clock = Clock()
    config = AdmissionConfig(initial_limit=10, min_limit=4, backoff=0.5, cooldown_s=0.1)
    control = AdmissionControl(config, clock)
    for _ in range(5):  # one slow burst: one decrease
        control.observe(0.080)
    assert control.limit == 5
    clock.now = 0.2
    control.observe(0.080)
    assert control.limit == 4  # 2.5, held at min_limit
    clock.now = 0.4
    control.observe(0.080)
    assert control.limit == 4


def test_the_limit_never_passes_its_maximum() -> None:
    control = AdmissionControl(AdmissionConfig(initial_limit=8, max_limit=8), Clock())
    control.in_flight = 8
    control.observe(0.001)
    assert control.limit == 8


def test_requests_past_the_limit_are_refused_and_counted() -> None:
    clock = Clock()
    control = AdmissionControl(
        AdmissionConfig(initial_limit=2, min_limit=1, max_limit=10, retry_after_s=2.0), clock
    )
    before = shed("t1", "concurrency")
    with control.admit("t1") as first, control.admit("t1"):
        assert control.in_flight == 2
        with pytest.raises(Overloaded) as refused, control.admit("t1"):
            pass
        first.served = True
        clock.now = 0.010
    assert refused.value.retry_after_s == 2.0
    assert refused.value.http_status == 503
    assert shed("t1", "concurrency") == before + 1
    assert control.in_flight == 0
    # Only the answered request's latency moved the limit (on time, two in flight: up by
    # 1 / limit); the one that was not answered moved nothing.
    assert control.limit == 2.5


def test_a_failed_request_does_not_move_the_limit() -> None:
    clock = Clock()
    control = AdmissionControl(AdmissionConfig(initial_limit=10), clock)
    with pytest.raises(RuntimeError), control.admit("t1"):
        clock.now = 5.0
        raise RuntimeError("downstream")
    assert control.limit == 10 and control.in_flight == 0


async def test_a_lagging_loop_refuses_new_requests_until_it_catches_up() -> None:
    control = AdmissionControl(AdmissionConfig(max_lag_s=0.02, interval_s=0.01))
    await control.start()
    try:
        await asyncio.sleep(0.05)
        assert control.refusal() is None
        block_the_loop(0.3)  # the sampler wakes 0.3 s late
        await asyncio.sleep(0.02)
        assert control.lag_s > 0.02
        assert control.refusal() == "loop_lag"
        before = shed("t2", "loop_lag")
        with pytest.raises(Overloaded), control.admit("t2"):
            pass
        assert shed("t2", "loop_lag") == before + 1
        for _ in range(100):  # the mean decays once the loop keeps time again
            await asyncio.sleep(0.01)
            if control.refusal() is None:
                break
        assert control.refusal() is None
    finally:
        await control.stop()


@pytest.mark.parametrize(
    ("initial", "low", "high"), [(2.0, 5.0, 256.0), (300.0, 280.0, 256.0), (8.0, 0.0, 256.0)]
)
def test_settings_out_of_order_fail_at_start_up(initial: float, low: float, high: float) -> None:
    settings = GatewaySettings(
        admission_limit=initial, admission_min_limit=low, admission_max_limit=high
    )
    with pytest.raises(ConfigError):
        settings.admission()


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """The mesh with a gateway that lets one recommendation in flight at a time."""
    tenants = write_tenants(tmp_path_factory.mktemp("admission") / "tenants.json")
    overrides = {
        "admission_limit": 1.0,
        "admission_min_limit": 1.0,
        "admission_max_limit": 1.0,
    }
    async with inprocess_mesh(
        redis_url, artifacts_root, tenants, gateway_overrides=overrides
    ) as running:
        yield running


async def test_the_http_api_refuses_the_excess_with_503_and_retry_after(mesh: Mesh) -> None:
    before = shed("demo", "concurrency")

    async def one(session: aiohttp.ClientSession, k: int) -> tuple[int, str, dict[str, str]]:
        async with session.post(
            mesh.http_url + "/v1/recommend",
            json={"user_id": f"u{k}"},
            headers={"x-api-key": "demo-key"},
        ) as response:
            body = await response.json()
            return response.status, body.get("error", ""), dict(response.headers)

    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(one(session, k) for k in range(20)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 503}, statuses
    refused = [(error, headers) for status, error, headers in answers if status == 503]
    assert all(
        error == "UNAVAILABLE" and headers["Retry-After"] == "1" for error, headers in refused
    )
    assert shed("demo", "concurrency") == before + len(refused)
