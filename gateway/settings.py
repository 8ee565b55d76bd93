"""Settings of the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.experiments.book import experiments_file
from gateway.admission import AdmissionConfig
from mesh.errors import ConfigError
from mesh.paths import VAR_DIR
from mesh.settings import (
    ServerSettings,
    downstream,
    env,
    gateway_http_port,
    port_of,
    tenants_file,
    tenants_poll_s,
)


@dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    """Environment of the gateway process. Budgets are in seconds."""

    service_name: str = "gateway"
    port: int = port_of("gateway")
    http_port: int = gateway_http_port()
    tenants: Path = tenants_file()
    tenants_poll_s: float = tenants_poll_s()
    experiments: Path = experiments_file()
    feature_addr: str = downstream("feature")
    retrieval_addr: str = downstream("retrieval")
    ranking_addr: str = downstream("ranking")
    experiment_addr: str = downstream("experiment")
    events_addr: str = downstream("events")
    quota_addr: str = downstream("quota")
    drain_delay_s: float = env(
        "RECMESH_DRAIN_DELAY_S",
        2.5,
        doc="seconds the HTTP API answers with Connection: close before the listener closes; "
        "longer than a keep-alive client's idle gap, so it learns before its socket is closed",
    )
    deadline_s: float = env("RECMESH_GATEWAY_DEADLINE_S", 0.100, doc="default request deadline")
    reply_margin_s: float = env(
        "RECMESH_GATEWAY_REPLY_MARGIN_S",
        0.003,
        doc="time kept back from the deadline to build and send the answer",
    )
    quota_budget_s: float = env("RECMESH_GATEWAY_QUOTA_BUDGET_S", 0.005, doc="quota stage cap")
    experiment_budget_s: float = env(
        "RECMESH_GATEWAY_EXPERIMENT_BUDGET_S", 0.005, doc="experiment stage cap"
    )
    experiment_cache_ttl_s: float = env(
        "RECMESH_GATEWAY_EXPERIMENT_CACHE_TTL_S",
        30.0,
        doc="how long an experiment assignment is served from the gateway's cache, which is "
        "how late a new experiment book reaches a cached user at worst; 0 turns the cache off",
    )
    experiment_cache_entries: int = env(
        "RECMESH_GATEWAY_EXPERIMENT_CACHE_ENTRIES",
        100_000,
        doc="(tenant, user) assignments the gateway's cache holds, least recently used "
        "evicted first; 0 turns the cache off",
    )
    exposure_memo_entries: int = env(
        "RECMESH_GATEWAY_EXPOSURE_MEMO_ENTRIES",
        100_000,
        doc="exposure event ids (one per tenant, user, experiment, variant and UTC day) the "
        "gateway remembers having sent, so it does not send them again (the events service "
        "drops repeats anyway); 0 sends every request's exposures",
    )
    report_timeout_s: float = env(
        "RECMESH_GATEWAY_REPORT_TIMEOUT_S",
        60.0,
        doc="timeout of GET /v1/experiments/{key}/report's call to the experiment service "
        "(a report reads the tenant's event log)",
    )
    erase_timeout_s: float = env(
        "RECMESH_GATEWAY_ERASE_TIMEOUT_S",
        60.0,
        doc="how long DELETE /v1/users/{user_id} waits for the events service's erasure "
        "before answering 202 (the erasure goes on; repeating the request is safe)",
    )
    retrieval_budget_s: float = env(
        "RECMESH_GATEWAY_RETRIEVAL_BUDGET_S", 0.025, doc="retrieval stage cap"
    )
    ranking_budget_s: float = env(
        "RECMESH_GATEWAY_RANKING_BUDGET_S", 0.045, doc="ranking stage cap"
    )
    events_timeout_s: float = env(
        "RECMESH_GATEWAY_EVENTS_TIMEOUT_S",
        1.0,
        doc="timeout of event writes (off the request path)",
    )
    impressions_batch: int = env(
        "RECMESH_GATEWAY_IMPRESSIONS_BATCH",
        200,
        doc="queued impressions of one tenant that end the linger, and the most one Append "
        "carries (1..1000, the events service's limit per call)",
    )
    impressions_linger_s: float = env(
        "RECMESH_GATEWAY_IMPRESSIONS_LINGER_S",
        0.15,
        doc="longest wait of a queued impression before it is sent (what a SIGKILL can lose)",
    )
    outbox: Path = env(
        "RECMESH_GATEWAY_OUTBOX", VAR_DIR / "outbox.db", doc="durable outbox of accepted events"
    )
    outbox_max_rows: int = env(
        "RECMESH_GATEWAY_OUTBOX_MAX_ROWS",
        200_000,
        doc="events accepted and not yet delivered beyond which POST /v1/events is refused "
        "(429, Retry-After) until the relay catches up: about 30 s of its delivery rate",
    )
    quota_fail_open: bool = env(
        "RECMESH_GATEWAY_QUOTA_FAIL_OPEN", True, doc="serve when the quota service is down"
    )
    quota_lease_max: int = env(
        "RECMESH_GATEWAY_QUOTA_LEASE_MAX",
        32,
        doc="most quota tokens one call may lease for a tenant (gateway/quota.py); "
        "1 turns leasing off: one quota call per request",
    )
    quota_lease_ttl_s: float = env(
        "RECMESH_GATEWAY_QUOTA_LEASE_TTL_S",
        0.5,
        doc="seconds a lease's tokens stay usable; unused ones expire and count as used",
    )
    quota_lease_refresh_ahead_s: float = env(
        "RECMESH_GATEWAY_QUOTA_LEASE_REFRESH_AHEAD_S",
        0.03,
        doc="a tenant's lease that will run out within this many seconds (by expiry or by "
        "the pace its tokens are taken) is refilled in the background; 0 turns it off",
    )
    usage_flush_s: float = env(
        "RECMESH_GATEWAY_USAGE_FLUSH_S",
        1.0,
        doc="seconds between the calls that carry the tenants' costs (CPU, candidates "
        "scored) to the quota service's usage; what a killed gateway loses at most "
        "(gateway/usage.py); 0 turns the cost record off",
    )
    max_body_bytes: int = env(
        "RECMESH_GATEWAY_MAX_BODY_BYTES", 1024 * 1024, doc="largest HTTP body accepted"
    )
    http_max_line_bytes: int = env(
        "RECMESH_GATEWAY_HTTP_MAX_LINE_BYTES",
        8190,
        doc="longest HTTP request line (method, path and query) accepted; longer: 400 and "
        "the connection closed",
    )
    http_max_field_bytes: int = env(
        "RECMESH_GATEWAY_HTTP_MAX_FIELD_BYTES",
        8190,
        doc="longest HTTP header (name and value) accepted; longer: 400 and the connection closed",
    )
    http_max_headers: int = env(
        "RECMESH_GATEWAY_HTTP_MAX_HEADERS",
        64,
        doc="most HTTP headers a request may carry; more: 400 and the connection closed",
    )
    http_head_timeout_s: float = env(
        "RECMESH_GATEWAY_HTTP_HEAD_TIMEOUT_S",
        15.0,
        doc="seconds an HTTP connection has, from its opening or its previous answer, to send "
        "a whole request line and headers; then it is closed (a slow client, or an idle "
        "keep-alive connection: aiohttp's keepalive_timeout is both)",
    )
    http_body_timeout_s: float = env(
        "RECMESH_GATEWAY_HTTP_BODY_TIMEOUT_S",
        10.0,
        doc="seconds a request's body has to arrive once its headers did; slower: 408 and "
        "the connection closed",
    )
    http_linger_s: float = env(
        "RECMESH_GATEWAY_HTTP_LINGER_S",
        1.0,
        doc="seconds the gateway goes on reading (and dropping) a body it answered without "
        "reading whole (413, 408) before it closes the connection",
    )
    grpc_max_metadata_bytes: int = env(
        "RECMESH_GATEWAY_GRPC_MAX_METADATA_BYTES",
        8192,
        doc="largest metadata (headers) a call to the gateway's gRPC API may send; larger: "
        "the call fails (RESOURCE_EXHAUSTED)",
    )
    grpc_handshake_timeout_s: float = env(
        "RECMESH_GATEWAY_GRPC_HANDSHAKE_TIMEOUT_S",
        5.0,
        doc="seconds a new connection to the gateway's gRPC API has to finish its TLS and "
        "HTTP/2 handshakes",
    )
    grpc_max_connection_idle_s: float = env(
        "RECMESH_GATEWAY_GRPC_MAX_CONNECTION_IDLE_S",
        300.0,
        doc="a gRPC connection with no call in flight for this long is closed (GOAWAY)",
    )
    grpc_max_connection_age_s: float = env(
        "RECMESH_GATEWAY_GRPC_MAX_CONNECTION_AGE_S",
        600.0,
        doc="a gRPC connection older than this is told to go away (clients reconnect); "
        "what a call stuck on a slow client can hold it, with the grace below",
    )
    grpc_max_connection_age_grace_s: float = env(
        "RECMESH_GATEWAY_GRPC_MAX_CONNECTION_AGE_GRACE_S",
        10.0,
        doc="seconds the calls of a connection told to go away get to finish before it is closed",
    )
    max_items: int = env("RECMESH_GATEWAY_MAX_ITEMS", 500, doc="largest num_items accepted")
    admission_limit: float = env(
        "RECMESH_GATEWAY_ADMISSION_LIMIT",
        32.0,
        doc="recommendations in flight allowed before any answer was measured (the limit "
        "then adapts; gateway/admission.py)",
    )
    admission_min_limit: float = env(
        "RECMESH_GATEWAY_ADMISSION_MIN_LIMIT", 8.0, doc="lowest adaptive in-flight limit"
    )
    admission_max_limit: float = env(
        "RECMESH_GATEWAY_ADMISSION_MAX_LIMIT",
        256.0,
        doc="highest adaptive in-flight limit (0: no in-flight limit)",
    )
    admission_target_s: float = env(
        "RECMESH_GATEWAY_ADMISSION_TARGET_S",
        0.050,
        doc="answers within this raise the in-flight limit, slower ones lower it",
    )
    admission_max_lag_s: float = env(
        "RECMESH_GATEWAY_ADMISSION_MAX_LAG_S",
        0.025,
        doc="event-loop lag above which new recommendations are refused (0: never)",
    )

    def grpc_server_options(self) -> list[tuple[str, int]]:
        """The gateway's gRPC server options for what a client may send and hold."""
        return [
            ("grpc.max_metadata_size", self.grpc_max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", self.grpc_max_metadata_bytes),
            ("grpc.server_handshake_timeout_ms", round(self.grpc_handshake_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", round(self.grpc_max_connection_idle_s * 1000)),
            ("grpc.max_connection_age_ms", round(self.grpc_max_connection_age_s * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                round(self.grpc_max_connection_age_grace_s * 1000),
            ),
        ]

    def http_limits(self) -> dict[str, float]:
        """The HTTP listener's limits on what a client may send and how slowly
        (``aiohttp.web.AppRunner`` options)."""
        return {
            "max_line_size": self.http_max_line_bytes,
            "max_field_size": self.http_max_field_bytes,
            "max_headers": self.http_max_headers,
            "keepalive_timeout": self.http_head_timeout_s,
            "lingering_time": self.http_linger_s,
        }

    def admission(self) -> AdmissionConfig:
        """The admission controller's configuration.

        Raises:
            ConfigError: the limits are out of order or a duration is not positive.
        """
        try:
            return AdmissionConfig(
                initial_limit=self.admission_limit,
                min_limit=self.admission_min_limit,
                max_limit=self.admission_max_limit,
                target_s=self.admission_target_s,
                max_lag_s=self.admission_max_lag_s,
            )
        except ValueError as exc:
            raise ConfigError(f"RECMESH_GATEWAY_ADMISSION_*: {exc}") from exc
