"""Prometheus metrics of the ranking cascade, in the default registry.

Serving them over HTTP is the metrics issue's job; until then they are readable in-process
(tests, the benchmark) through ``prometheus_client.REGISTRY``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.05,
    0.1,
)

STAGE_SECONDS = Histogram(
    "recmesh_ranking_stage_seconds",
    "Time spent in each ranking stage",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
DEGRADED = Counter(
    "recmesh_ranking_degraded_total",
    "Ranking stages that degraded, by stage, reason code and tenant",
    ["stage", "reason", "tenant"],
)
CACHE_LOOKUPS = Counter(
    "recmesh_ranking_item_cache_lookups_total",
    "Item feature cache lookups by result (hit or miss)",
    ["result"],
)
CACHE_HIT_RATIO = Gauge(
    "recmesh_ranking_item_cache_hit_ratio",
    "Share of item feature lookups served from the cache since start",
)
CACHE_ENTRIES = Gauge(
    "recmesh_ranking_item_cache_entries", "Item rows held by the item feature cache"
)
CACHE_BYTES = Gauge(
    "recmesh_ranking_item_cache_bytes", "Bytes the item feature cache reserved for rows"
)
QUALITY = Gauge(
    "recmesh_ranking_quality_factor",
    "Adaptive quality factor of each stage (share of the configured candidate count)",
    ["stage"],
)
EXPLORED = Counter(
    "recmesh_ranking_explore_slots_total", "Slots filled by the exploration policy", ["tenant"]
)
