"""Prometheus metrics of the shared runtime (every process registers the same names)."""

from __future__ import annotations

import pybreaker
from prometheus_client import Counter, Gauge, Histogram

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

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Seconds: calls inside a 100 ms request, with room for slow and timed-out ones."""

RPC_SERVER_HANDLED = Counter(
    "recmesh_rpc_server_handled_total",
    "Calls a server answered, by gRPC service, method and status code (rate and errors)",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SERVER_SECONDS = Histogram(
    "recmesh_rpc_server_handling_seconds",
    "Time a server took to answer a call, by gRPC service and method (duration)",
    ["grpc_service", "grpc_method"],
    buckets=RPC_BUCKETS,
)
RPC_CLIENT_SECONDS = Histogram(
    "recmesh_rpc_client_handling_seconds",
    "Time one attempt of an outgoing call took, by gRPC service, method and status code",
    ["grpc_service", "grpc_method", "grpc_code"],
    buckets=RPC_BUCKETS,
)
TENANT_CPU_SECONDS = Counter(
    "recmesh_tenant_cpu_seconds_total",
    "CPU seconds a service spent for a tenant: its calls' own handler steps and the "
    "background work done on its behalf (mesh.cpu, docs/usage.md)",
    ["service", "tenant"],
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
