"""One short real run: the HTTP locustfile, headless, against the mesh in-process."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from loadtest.steps import Traffic, locust_command
from loadtest.traffic import TenantKey, write_tenant_keys
from mesh.paths import PROJECT_ROOT
from tests.inprocess import Mesh


async def test_the_http_locustfile_gets_answers_and_clicks_accepted(
    mesh: Mesh, artifacts_root: Path, tmp_path: Path
) -> None:
    keys = [TenantKey("demo", "demo-key", 3.0), TenantKey("acme", "acme-key", 1.0)]
    traffic = Traffic(
        artifacts=artifacts_root,
        tenant_keys=write_tenant_keys(tmp_path / "keys.json", keys),
        click_share=0.5,
        zipf=0.8,
        seed=1,
    )
    record = tmp_path / "requests.jsonl"
    command = locust_command(mesh.http_url, 10, 1.0, 6, traffic, record)
    command += ["--think-s", "0.05,0.1", "--exit-code-on-error", "3"]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, output.decode()[-3000:]

    records = [json.loads(line) for line in record.read_text().splitlines()]
    recommendations = [r for r in records if r["k"] == "rec"]
    clicks = [r for r in records if r["k"] == "evt"]
    assert len(recommendations) >= 20
    assert Counter((r["s"], r["e"]) for r in recommendations) == {(200, ""): len(recommendations)}
    assert all(r["n"] == 10 and r["r"] for r in recommendations)
    assert clicks, "a share of the answers was clicked"
    assert Counter((r["s"], r["e"]) for r in clicks) == {(202, ""): len(clicks)}
    assert {r["tn"] for r in recommendations} == {"demo", "acme"}
