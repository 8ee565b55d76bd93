"""Schemathesis, every check, against the gateway's own OpenAPI document: every operation
gets the document's examples, its boundary values (coverage), generated valid and invalid
requests (fuzzing) and chained calls (stateful), and nothing may be found: no 500, no
answer that differs from its documented schema or status codes, no valid request refused,
no invalid request accepted (``docs/security.md``, "The HTTP schema is the validator").

Run by itself (``FUZZ_EXAMPLES`` examples per operation and phase, 25 by default;
``FUZZ_SEED`` for a random run rather than the deterministic one)::

    FUZZ_EXAMPLES=200 FUZZ_SEED=7 .venv/bin/python -m pytest tests/gateway/test_schemathesis.py

The gateway's clock is fixed for the run: its document states the window of event times
it accepts as of that clock, so the window the fuzzer read is the one the server applies.
Deterministic: Hypothesis derandomised (``--generation-deterministic``), one worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.inprocess import Mesh, inprocess_mesh, write_tenants

PROJECT = Path(__file__).resolve().parents[2]
FUZZ_KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("FUZZ_SEED", "")


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """A mesh of its own with a ``fuzz`` tenant (what the fuzz writes stays in its log) and
    the gateway's clock fixed."""
    tenants = write_tenants(
        tmp_path_factory.mktemp("fuzz") / "tenants.json", {"fuzz": (FUZZ_KEY, 10_000, 100_000)}
    )
    now = time.time()
    async with inprocess_mesh(
        redis_url, artifacts_root, tenants, gateway_clock=lambda: now
    ) as running:
        yield running


def st_command(url: str) -> list[str]:
    """``st run`` against the gateway at ``url`` with every check."""
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--checks=all",
        f"--header=x-api-key: {FUZZ_KEY}",
        f"--max-examples={EXAMPLES}",
        # FUZZ_SEED=<n>: a random run (to explore); by default a deterministic one (CI).
        f"--seed={SEED}" if SEED else "--generation-deterministic",
        "--workers=1",
        "--no-color",
        "--continue-on-failure",
    ]


def features_of(document: dict[str, Any]) -> dict[str, Any]:
    items = document["components"]["schemas"]["ItemsRequest"]["properties"]["items"]
    features: dict[str, Any] = items["items"]["properties"]["features"]
    return features


async def pinned_document(mesh: Mesh) -> dict[str, Any]:
    """The OpenAPI document once it states the item feature width: the gateway waits 0.25 s
    at most for the tenants' widths (then serves the document without), and caches them."""
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            async with session.get(mesh.http_url + "/openapi.json") as response:
                assert response.status == 200
                document: dict[str, Any] = await response.json()
            if "maxItems" in features_of(document):
                return document
            await asyncio.sleep(0.1)
    raise AssertionError("the document never stated the item feature width")


async def test_the_document_states_the_item_width_and_the_event_window(mesh: Mesh) -> None:
    document = await pinned_document(mesh)
    features = features_of(document)
    assert features["minItems"] == features["maxItems"] > 0
    ts = document["components"]["schemas"]["EventsRequest"]["properties"]["events"]["items"][
        "properties"
    ]["ts"]
    assert ts["maximum"] - ts["minimum"] == (7 * 24 + 24) * 3_600_000


async def test_schemathesis_finds_nothing(mesh: Mesh, tmp_path: Path) -> None:
    await pinned_document(mesh)  # the widths cached (60 s) for the document st loads
    process = await asyncio.create_subprocess_exec(
        *st_command(mesh.http_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": str(PROJECT),
            "SCHEMATHESIS_HOOKS": "tests.gateway.schemathesis_hooks",
        },
    )
    out, _ = await process.communicate()
    report = out.decode()
    assert process.returncode == 0, report
    assert "No issues found" in report, report


def fresh_event(**changes: Any) -> dict[str, Any]:
    event = {"event_id": "e-" + str(time.time_ns()), "type": "click", "user_id": "u1"}
    return event | {"ts": int(time.time() * 1000)} | changes


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        # Found as a new user would (issue 17), and by the fuzz: each was a 500 or a 400.
        ("POST", "/v1/recommend", {"user_id": "u1", "num_items": 1.0}, 200, None),
        (
            "POST",
            "/v1/events",
            {"events": [fresh_event(position=2**31)]},
            400,
            "events[0].position",
        ),
        ("POST", "/v1/events", {"events": [fresh_event(ts=2**63)]}, 400, "events[0].ts"),
        ("POST", "/v1/events", {"events": [fresh_event(item_id=2**63)]}, 400, "events[0].item_id"),
        ("POST", "/v1/events", {"events": [fresh_event(ts=0)]}, 400, "events[0].ts"),
        ("POST", "/v1/events", {"events": [fresh_event(event_id="")]}, 400, "events[0].event_id"),
        (
            "POST",
            "/v1/events",
            {"events": [fresh_event(user_id="\ud800")]},
            400,
            "events[0].user_id",
        ),
        ("POST", "/v1/events", {"events": [fresh_event()]}, 202, None),
        ("POST", "/v1/recommend", b"[" * 100_000, 400, "body"),
        ("POST", "/v1/recommend", b'{"user_id": "u1", "context": {"a": NaN}}', 400, "body"),
    ],
)
async def test_the_cases_that_were_500s_or_refused_in_vain(
    mesh: Mesh, method: str, path: str, body: Any, status: int, field: str | None
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, mesh.http_url + path, data=raw, headers={"x-api-key": FUZZ_KEY}
        ) as response,
    ):
        reply = await response.json()
    assert response.status == status, reply
    if field is not None:
        assert reply["field"] == field, reply
    if status == 202:
        assert reply == {"accepted": 1}


async def test_an_item_category_beyond_int32_is_400_not_500(mesh: Mesh) -> None:
    width = features_of(await pinned_document(mesh))["maxItems"]
    item = {"item_id": "big-category", "category": 2**31, "features": [0.5] * width}
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            mesh.http_url + "/v1/items", json={"items": [item]}, headers={"x-api-key": FUZZ_KEY}
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["field"] == "items[0].category"


async def test_a_request_id_metadata_cannot_carry_is_replaced_not_a_500(mesh: Mesh) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mesh.http_url + "/v1/recommend",
            json={"user_id": "u1", "num_items": 3},
            headers={"x-api-key": FUZZ_KEY, "x-request-id": "a\tb"},
        ) as response,
    ):
        assert response.status == 200
        assert (await response.json())["request_id"] not in ("", "a\tb")
