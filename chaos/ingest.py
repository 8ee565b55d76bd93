"""The chaos suite's event ingest: a steady stream of clicks and impressions posted to
``POST /v1/events`` (:func:`loadtest.ingest.post_steadily`), one JSON line per post.

Run as its own process (``python -m chaos.ingest ...``) next to the locust load, so the
event log receives, besides the impressions of the answers and the load's clicks, events
an application posts at a fixed rate whatever the mesh does. The lines (format in
:mod:`loadtest.ingest`) let the suite check that every accepted event reached the log
exactly once. It stops when ``--stop-file`` appears or ``--duration`` elapses. Only
127.0.0.1 is ever targeted.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from urllib.parse import urlparse

from loadtest.ingest import Post, post_steadily
from loadtest.traffic import Recorder, ZipfUsers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.ingest", description=__doc__)
    parser.add_argument("--url", required=True, help="gateway HTTP base URL (127.0.0.1 only)")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--batch", type=int, default=10, help="events per post")
    parser.add_argument("--click-share", type=float, default=0.2)
    parser.add_argument("--n-users", type=int, default=1000, help="user ids u0..u<n-1>")
    parser.add_argument("--n-items", type=int, default=1000, help="item ids 0..<n-1>")
    parser.add_argument("--duration", type=float, default=3600.0, help="upper bound, seconds")
    parser.add_argument("--stop-file", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="JSON-lines output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname != "127.0.0.1":
        raise SystemExit("chaos ingest only targets 127.0.0.1")
    recorder = Recorder(args.out)

    def record(post: Post) -> None:
        recorder.add(post.record())

    try:
        asyncio.run(
            post_steadily(
                args.url,
                args.api_key,
                rate=args.rate,
                batch=args.batch,
                click_share=args.click_share,
                users=ZipfUsers(args.n_users, exponent=0.0, seed=args.seed),
                n_items=args.n_items,
                on_post=record,
                duration_s=args.duration,
                stop=args.stop_file.exists,
                seed=args.seed,
            )
        )
    finally:
        recorder.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
