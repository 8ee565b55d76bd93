"""The scenarios of the chaos suite: what is broken, for how long, and which bars apply.

Pure data; :mod:`chaos.run` performs them. The list follows issue 5 and the
reliability table: SIGKILL each internal service in turn (the events service stays down
30 s), SIGSTOP the feature service, 50 % UNAVAILABLE from ranking, +200 ms on retrieval,
a Redis restart and a SIGTERM of the gateway; and issue 13's faults of the event log under
ingest: SIGKILL the projector, and the Redis restart, each with the bars that every
accepted event is in the log exactly once and that the projections equal a recount from
the log once the projector caught up.

Redis is restarted the way an operator restarts it: SIGTERM (``valkey-cli shutdown``, a
service manager's stop), on which Valkey writes and fsyncs its append-only file before
exiting, so nothing it acknowledged is lost. A SIGKILL is not in the suite because it can
lose acknowledged events (``docs/events.md``, "Redis restarts and durability"): with
``appendfsync everysec`` an acknowledged write is normally already in the kernel's page
cache and survives the process, but Valkey holds writes in its own memory for up to 2 s
while a slow fsync is still running, and a SIGKILL then loses them; a 0-lost bar would
pass or fail with the disk's speed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["kill", "stop", "flag", "redis", "term"]

BAR_TEXT: dict[str, str] = {
    "answered": "answered within the deadline >= 99.9 %",
    "lost": "events lost = 0",
    "amplification": "retry amplification <= 1.2",
    "drain": "SIGTERM drain: 0 errors",
    "p99": "p99 <= deadline",
    "opens": "breaker opens",
    "closes": "breaker closes after recovery",
    "once": "every accepted event in the log exactly once",
    "verify": "projections = a recount from the log (lag 0)",
}
"""Every bar a scenario can carry. The first four are issue 5's, ``once`` and ``verify``
issue 13's; the others are rows of the reliability table."""

ISSUE_BARS = frozenset({"answered", "lost", "amplification", "drain"})
ISSUE_13_BARS = frozenset({"once", "verify"})

ALWAYS = ("lost", "amplification")
"""Bars of every scenario: no event is lost and retries never multiply load."""


@dataclass(frozen=True)
class Scenario:
    """One fault, held for ``fault_s`` seconds, then repaired.

    Attributes:
        name: short id (file names, ``--only``).
        title: what is done, for people.
        action: ``kill`` (SIGKILL, restart), ``stop`` (SIGSTOP, SIGCONT), ``flag``
            (fault flags file, cleared), ``redis`` (SIGTERM Redis, start it again),
            ``term`` (SIGTERM the gateway, wait for its exit, start it again).
        target: the process acted on.
        fault_s: how long the fault lasts before the repair starts.
        stages: ``degraded`` names that show the fault in answers.
        downstream: the gateway's breaker in front of ``target`` (None: no such breaker).
        flags: the fault flags document of a ``flag`` scenario.
        bars: bars besides :data:`ALWAYS`.
        expect: what the user must see, from the reliability table.
    """

    name: str
    title: str
    action: Action
    target: str
    fault_s: float
    stages: tuple[str, ...] = ()
    downstream: str | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)
    bars: tuple[str, ...] = ()
    expect: str = ""

    @property
    def all_bars(self) -> tuple[str, ...]:
        return (*self.bars, *ALWAYS)

    @property
    def projects(self) -> bool:
        """Whether the projector catching up is part of recovering (the scenarios that
        carry the ``verify`` bar)."""
        return "verify" in self.bars


FEATURE_STAGES = ("trending", "catalog", "item_features", "item_counters")
"""What the feature service's loss shows in answers: the lists and rows retrieval and
ranking keep and refresh from it, once too old to serve. (Retrieval reads a request's
user from the store itself, so ``user_features`` shows the store's loss, not this
service's.)"""


def default_scenarios(fault_s: float = 20.0, long_fault_s: float = 30.0) -> list[Scenario]:
    """The suite, in run order (the gateway's SIGTERM last: it resets its counters)."""
    kills = [
        Scenario(
            f"kill-{name}",
            f"SIGKILL {name}, restart after {fault_s:g} s",
            "kill",
            name,
            fault_s,
            stages=stages,
            downstream=downstream,
            bars=bars,
            expect=expect,
        )
        for name, stages, downstream, bars, expect in [
            (
                "feature",
                FEATURE_STAGES,
                None,
                ("answered",),
                "users still read from the store; trending, the live catalog and the item "
                "counters served from the caches until they age out",
            ),
            ("retrieval", ("retrieval",), "retrieval", ("answered",), "popular-items fallback"),
            (
                "ranking",
                ("ranking",),
                "ranking",
                ("answered", "p99", "opens", "closes"),
                "answers in retrieval order; breaker opens, closes after restart",
            ),
            ("experiment", ("experiment",), "experiment", ("answered",), "control variants"),
            ("quota", ("quota",), "quota", ("answered",), "fail open"),
        ]
    ]
    return [
        *kills,
        Scenario(
            "kill-events",
            f"SIGKILL events, down {long_fault_s:g} s, restart",
            "kill",
            "events",
            long_fault_s,
            downstream="events",
            bars=("answered",),
            expect="events wait in the gateway's outbox and are delivered after it returns",
        ),
        Scenario(
            "kill-projector",
            f"SIGKILL the projector under event ingest, restart after {fault_s:g} s",
            "kill",
            "projector",
            fault_s,
            bars=("answered", "once", "verify"),
            expect=(
                "answers unaffected; the log grows while nobody projects it; the restarted "
                "projector catches up, claims what the killed one held unacknowledged, and "
                "counts nothing twice"
            ),
        ),
        Scenario(
            "stop-feature",
            f"SIGSTOP feature {long_fault_s:g} s, then SIGCONT",
            "stop",
            "feature",
            long_fault_s,
            stages=FEATURE_STAGES,
            bars=("p99",),
            expect="cache refreshes time out in the background; requests do not wait on it",
        ),
        Scenario(
            "ranking-unavailable-50",
            f"ranking fails 50 % of calls with UNAVAILABLE for {long_fault_s:g} s",
            "flag",
            "ranking",
            long_fault_s,
            stages=("ranking",),
            downstream="ranking",
            flags={"ranking": {"Rank": {"error_rate": 0.5, "code": "UNAVAILABLE"}}},
            bars=("opens",),
            expect="retry budget caps attempts; the failure-rate breaker opens",
        ),
        Scenario(
            "retrieval-latency-200ms",
            f"+200 ms on every retrieval call for {long_fault_s:g} s",
            "flag",
            "retrieval",
            long_fault_s,
            stages=("retrieval",),
            downstream="retrieval",
            flags={"retrieval": {"Retrieve": {"latency_ms": 200}}},
            bars=("p99",),
            expect="the stage times out and falls back; retries do not multiply load",
        ),
        Scenario(
            "redis-restart",
            "Redis stopped (SIGTERM) under event ingest, started again after 5 s",
            "redis",
            "redis",
            5.0,
            stages=("quota", "user_features", *FEATURE_STAGES),
            bars=("once", "verify"),
            expect=(
                "services report NOT_SERVING, reconnect and recover; accepted events wait in "
                "the outbox and reach the log once; the projector resumes where its group "
                "stopped"
            ),
        ),
        Scenario(
            "term-gateway",
            "SIGTERM the gateway under load, start it again once it exited",
            "term",
            "gateway",
            0.0,
            bars=("drain",),
            expect="health NOT_SERVING, in-flight calls finish, then exit",
        ),
    ]


def select(scenarios: list[Scenario], names: list[str]) -> list[Scenario]:
    """The scenarios named, in suite order (all when ``names`` is empty).

    Raises:
        ValueError: a name that is no scenario.
    """
    known = {s.name for s in scenarios}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(known)}")
    return [s for s in scenarios if not names or s.name in names]
