"""Repeated warnings are throttled without losing count of them."""

from __future__ import annotations

import logging

from mesh.logging import RepeatThrottle


def record(msg: str, level: int = logging.WARNING, *args: object) -> logging.LogRecord:
    return logging.LogRecord("gateway.funnel", level, __file__, 1, msg, args, None)


def test_a_storm_of_one_warning_passes_a_burst_then_reports_what_it_dropped() -> None:
    now = [0.0]
    throttle = RepeatThrottle(burst=3, window_s=1.0, clock=lambda: now[0])
    passed = [
        throttle.filter(record("quota unavailable: %s", logging.WARNING, i)) for i in range(10)
    ]
    assert passed == [True] * 3 + [False] * 7

    now[0] = 1.5
    next_window = record("quota unavailable: %s", logging.WARNING, "x")
    assert throttle.filter(next_window)
    assert next_window.fields == {"suppressed": 7}  # type: ignore[attr-defined]
    again = record("quota unavailable: %s", logging.WARNING, "y")
    assert throttle.filter(again)
    assert not hasattr(again, "fields")


def test_templates_are_throttled_apart_and_errors_always_pass() -> None:
    throttle = RepeatThrottle(burst=1, window_s=60.0, clock=lambda: 0.0)
    assert throttle.filter(record("quota unavailable: %s"))
    assert not throttle.filter(record("quota unavailable: %s"))
    assert throttle.filter(record("ranking unavailable: %s"))
    assert all(throttle.filter(record("outbox write failed", logging.ERROR)) for _ in range(5))
