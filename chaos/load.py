"""The load generator: locust, headless, at a steady rate, one JSON line per request.

Run as its own process (``python -m chaos.load ...``, from the project root) because
locust monkey-patches the standard library for gevent at import time, which must never
happen in the process that drives the mesh. The users are the HTTP API users of the load
tests (:class:`loadtest.users.HttpShopper`), many and slow (0.5 recommendations/s each),
on evenly interleaved fixed grids (:class:`loadtest.traffic.Pacer`), so the total arrival
rate stays fixed whatever the mesh does: a request that stalls delays only its own user,
and a user that fell behind catches up at once.

The traffic is the chaos suite's own: one tenant, users drawn uniformly, and for a share
of the answers a click on a returned item at once (no think time), so every second of
a scenario carries clicks. Records are those of :mod:`loadtest.traffic` (the suite reads
``k``, ``t``, ``ms``, ``s``, ``e``, ``d``, ``r``, ``n`` and ``id``). Locust stops when
``--stop-file`` appears or ``--duration`` elapses. Only 127.0.0.1 is ever targeted.
"""

from __future__ import annotations

# locust patches the standard library for gevent when imported (so time.sleep yields to
# other users): keep it first.
from loadtest.users import HttpShopper, configure  # isort: skip

import argparse
import logging
import time
from pathlib import Path
from urllib.parse import urlparse

from locust.env import Environment

from loadtest.traffic import PER_USER_RATE, Recorder, TenantKey, TrafficModel, ZipfUsers


class ChaosUser(HttpShopper):
    """The suite's user; :func:`run` points it at the mesh and configures its traffic."""


def run(args: argparse.Namespace) -> int:
    """Run locust until the stop file appears or the duration is over."""
    if urlparse(args.url).hostname != "127.0.0.1":
        raise SystemExit("chaos load only targets 127.0.0.1")
    logging.basicConfig(level=logging.WARNING)
    users = max(1, round(args.rate / PER_USER_RATE))
    recorder = Recorder(Path(args.out))
    model = TrafficModel(
        users=ZipfUsers(args.n_users, exponent=0.0, seed=args.seed),
        tenants=(TenantKey(args.tenant, args.api_key),),
        click_share=args.click_share,
        think_s=(0.0, 0.0),
    )
    configure(ChaosUser, model, args.rate / users, recorder, args.seed)
    ChaosUser.host = args.url
    environment = Environment(user_classes=[ChaosUser], host=args.url)
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=users)
    stop_file = Path(args.stop_file)
    deadline = time.monotonic() + args.duration
    print(f"load: {users} users, {args.rate:g} requests/s against {args.url}", flush=True)
    while time.monotonic() < deadline and not stop_file.exists():
        time.sleep(1.0)
        recorder.flush()
    runner.quit()
    recorder.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.load", description=__doc__)
    parser.add_argument("--url", required=True, help="gateway HTTP base URL (127.0.0.1 only)")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--tenant", required=True, help="the tenant the key belongs to")
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
