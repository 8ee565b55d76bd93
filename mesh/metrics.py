"""Prometheus metrics of the shared runtime (every process registers the same names)."""

from __future__ import annotations

import pybreaker
from prometheus_client import Counter, Gauge

DOWNSTREAM_CALLS = Counter(
    "recmesh_downstream_attempts_total",
    "Attempts sent to a downstream service, by outcome status code",
    ["downstream", "code"],
)
DOWNSTREAM_RETRIES = Counter(
    "recmesh_downstream_retries_total", "Retries sent to a downstream service", ["downstream"]
)
DOWNSTREAM_REJECTED = Counter(
    "recmesh_downstream_rejected_total",
    "Calls not sent to a downstream: breaker open or bulkhead full",
    ["downstream", "reason"],
)
BREAKER_STATE = Gauge(
    "recmesh_breaker_state",
    "Circuit breaker state per downstream: 0 closed, 1 half-open, 2 open",
    ["downstream"],
)
BREAKER_TRANSITIONS = Counter(
    "recmesh_breaker_transitions_total",
    "Circuit breaker state changes per downstream, by new state",
    ["downstream", "state"],
)

_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}


class BreakerMetrics(pybreaker.CircuitBreakerListener):
    """Exports a breaker's state changes as :data:`BREAKER_STATE` and transitions."""

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        name = str(cb.name)
        BREAKER_STATE.labels(name).set(_STATE_VALUES.get(new_state.name, 0))
        BREAKER_TRANSITIONS.labels(name, new_state.name).inc()
