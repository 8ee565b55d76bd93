"""The load generator: locust, headless, at a steady rate, one JSON line per request.

Run as its own process (``python -m chaos.load ...``) because locust monkey-patches the
standard library for gevent at import time, which must never happen in the process that
drives the mesh. Every ``FastHttpUser`` fires its task on a fixed time grid
(:func:`fixed_schedule`, users evenly staggered), so the total arrival rate stays fixed
whatever the mesh does: a request that stalls delays only its own user, and a user
that fell behind catches up at once. Users are many and slow (0.5 requests/s each).

Each task asks for a recommendation and, for a share of them, posts one click with a
fresh event id. Every request becomes one line of the output file::

    {"k": "rec", "t": 1700000000.123, "ms": 23.4, "s": 200, "e": "", "d": ["ranking"],
     "r": "<request id>", "n": 10}
    {"k": "evt", "t": 1700000000.150, "ms": 4.1, "s": 202, "e": "", "id": "<event id>"}

``t`` is the wall-clock start, ``s`` the HTTP status (0 when none arrived) and ``e`` the
error kind: ``refused`` (nothing listening), ``reset`` (connection closed under the
request), ``timeout``, ``http`` (an error status), ``body`` (unparseable answer) or
``other:<type>``. Locust stops when ``--stop-file`` appears or ``--duration`` elapses.
Only 127.0.0.1 is ever targeted.
"""

from __future__ import annotations

# locust patches the standard library for gevent when imported (so time.sleep yields to
# other users): keep it first.
from locust import FastHttpUser, task  # isort: skip

import argparse
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from locust.env import Environment

PER_USER_RATE = 0.5
"""Requests per second of one simulated user; the rate sets how many users run."""


def fixed_schedule(rate: float) -> Callable[[Any], float]:
    """A locust ``wait_time`` that starts a user's tasks on a fixed grid of ``1 / rate`` s.

    Unlike ``constant_throughput`` (which anchors every user at its construction, so users
    spawned together fire together forever), the grid starts at the user's ``next_due``,
    set after its staggered start. A task that overran is followed at once by the one
    that fell due meanwhile: arrivals keep their rate whatever the mesh does.
    """
    period = 1.0 / rate

    def wait_time(user: Any) -> float:
        user.next_due += period
        return max(0.0, float(user.next_due - time.perf_counter()))

    return wait_time


def error_kind(error: BaseException | None, status: int) -> str:
    """The error class recorded for one request (empty when it succeeded)."""
    if error is None:
        return "" if 200 <= status < 300 else "http"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, TimeoutError) or type(error).__name__ == "Timeout":
        return "timeout"
    if isinstance(error, ConnectionError) or type(error).__name__ == "HTTPConnectionClosed":
        return "reset"
    if status >= 400:
        return "http"
    return f"other:{type(error).__name__}"


class Recorder:
    """Buffers records and appends them to ``path`` once a second."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lines: list[str] = []

    def add(self, record: dict[str, Any]) -> None:
        self._lines.append(json.dumps(record, separators=(",", ":")))

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            with self._path.open("a") as out:
                out.write("\n".join(lines) + "\n")


class MeshUser(FastHttpUser):
    """One simulated client of the HTTP API; configured by :func:`configure`."""

    abstract = True
    wait_time = fixed_schedule(PER_USER_RATE)
    network_timeout = 2.0
    connection_timeout = 1.0
    max_retries = 0
    api_key = ""
    n_users = 1000
    click_share = 0.2
    recorder: Recorder
    seed = 0
    _count = 0

    users = 1

    def on_start(self) -> None:
        MeshUser._count += 1
        self.rng = random.Random(self.seed * 100_003 + MeshUser._count)
        # Users start in one batch; spreading their first request evenly over one period
        # makes requests arrive one by one rather than in a burst every 1/PER_USER_RATE s.
        time.sleep((MeshUser._count % self.users) / (self.users * PER_USER_RATE))
        self.next_due = time.perf_counter()

    def _post(self, path: str, body: dict[str, Any]) -> tuple[float, float, int, str, Any]:
        started = time.time()
        clock = time.perf_counter()
        response = self.client.post(
            path,
            data=json.dumps(body),
            headers={"x-api-key": self.api_key, "content-type": "application/json"},
        )
        status = int(response.status_code or 0)
        kind = error_kind(getattr(response, "error", None), status)
        document: Any = None
        if not kind:
            try:
                document = json.loads(response.content or b"null")
            except ValueError:
                kind = "body"
        ms = (time.perf_counter() - clock) * 1000.0
        return started, ms, status, kind, document

    @task
    def recommend_then_click(self) -> None:
        user = f"u{self.rng.randrange(self.n_users)}"
        started, ms, status, kind, body = self._post(
            "/v1/recommend", {"user_id": user, "num_items": 10}
        )
        items: list[int] = []
        record: dict[str, Any] = {"k": "rec", "t": round(started, 4), "ms": round(ms, 2)}
        record |= {"s": status, "e": kind}
        if isinstance(body, dict):
            items = [int(i["item_id"]) for i in body.get("items", [])]
            record |= {"d": body.get("degraded", []), "r": body.get("request_id", "")}
            record["n"] = len(items)
        self.recorder.add(record)
        if self.rng.random() >= self.click_share:
            return
        event_id = uuid.UUID(int=self.rng.getrandbits(128), version=4).hex
        event = {
            "event_id": event_id,
            "type": "click",
            "user_id": user,
            "item_id": self.rng.choice(items) if items else self.rng.randrange(1000),
            "ts": int(time.time() * 1000),
        }
        started, ms, status, kind, _ = self._post("/v1/events", {"events": [event]})
        self.recorder.add(
            {"k": "evt", "t": round(started, 4), "ms": round(ms, 2), "s": status, "e": kind}
            | {"id": event_id}
        )


def configure(args: argparse.Namespace, users: int) -> type[MeshUser]:
    """A concrete user class carrying this run's settings."""
    if urlparse(args.url).hostname != "127.0.0.1":
        raise SystemExit("chaos load only targets 127.0.0.1")
    return type(
        "ChaosUser",
        (MeshUser,),
        {
            "abstract": False,
            "host": args.url,
            "api_key": args.api_key,
            "n_users": args.n_users,
            "click_share": args.click_share,
            "recorder": Recorder(Path(args.out)),
            "seed": args.seed,
            "users": users,
        },
    )


def run(args: argparse.Namespace) -> int:
    """Run locust until the stop file appears or the duration is over."""
    logging.basicConfig(level=logging.WARNING)
    users = max(1, round(args.rate / PER_USER_RATE))
    user_class = configure(args, users)
    environment = Environment(user_classes=[user_class], host=args.url)
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=users)
    stop_file = Path(args.stop_file)
    deadline = time.monotonic() + args.duration
    print(f"load: {users} users, {args.rate:g} requests/s against {args.url}", flush=True)
    while time.monotonic() < deadline and not stop_file.exists():
        time.sleep(1.0)
        user_class.recorder.flush()
    runner.quit()
    user_class.recorder.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.load", description=__doc__)
    parser.add_argument("--url", required=True, help="gateway HTTP base URL (127.0.0.1 only)")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--rate", type=float, default=25.0, help="recommendations per second")
    parser.add_argument("--click-share", type=float, default=0.2)
    parser.add_argument("--n-users", type=int, default=1000, help="user ids u0..u<n-1>")
    parser.add_argument("--duration", type=float, default=1200.0, help="upper bound, seconds")
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--out", required=True, help="JSON-lines output")
    parser.add_argument("--seed", type=int, default=0)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
