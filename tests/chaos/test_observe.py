"""Parsing the gateway's /metrics into the figures the chaos suite tracks."""

from __future__ import annotations

from chaos.observe import parse_metrics

EXPOSITION = """\
# HELP recmesh_breaker_state Circuit breaker state per downstream
# TYPE recmesh_breaker_state gauge
recmesh_breaker_state{downstream="ranking"} 2.0
recmesh_breaker_state{downstream="quota"} 0.0
# TYPE recmesh_breaker_transitions_total counter
recmesh_breaker_transitions_total{downstream="ranking",state="open"} 3.0
recmesh_breaker_transitions_total{downstream="ranking",state="half-open"} 2.0
# TYPE recmesh_downstream_attempts_total counter
recmesh_downstream_attempts_total{code="OK",downstream="ranking"} 90.0
recmesh_downstream_attempts_total{code="UNAVAILABLE",downstream="ranking"} 10.0
recmesh_downstream_attempts_created{code="OK",downstream="ranking"} 1.7e+09
# TYPE recmesh_downstream_retries_total counter
recmesh_downstream_retries_total{downstream="ranking"} 4.0
# TYPE recmesh_downstream_rejected_total counter
recmesh_downstream_rejected_total{downstream="ranking",reason="breaker_open"} 7.0
recmesh_downstream_rejected_total{downstream="ranking",reason="bulkhead_full"} 1.0
# TYPE recmesh_gateway_requests_total counter
recmesh_gateway_requests_total{api="http",code="200",route="/v1/recommend",tenant="demo"} 120.0
recmesh_gateway_requests_total{api="http",code="503",route="/v1/recommend",tenant="demo"} 5.0
recmesh_gateway_requests_total{api="http",code="202",route="/v1/events",tenant="demo"} 30.0
recmesh_gateway_requests_total{api="grpc",code="OK",route="/v1/recommend",tenant="demo"} 9.0
# TYPE recmesh_gateway_request_seconds histogram
recmesh_gateway_request_seconds_bucket{api="http",le="0.05",route="/v1/recommend"} 100.0
recmesh_gateway_request_seconds_bucket{api="http",le="0.1",route="/v1/recommend"} 118.0
recmesh_gateway_request_seconds_bucket{api="http",le="+Inf",route="/v1/recommend"} 125.0
recmesh_gateway_request_seconds_count{api="http",route="/v1/recommend"} 125.0
recmesh_gateway_request_seconds_sum{api="http",route="/v1/recommend"} 4.2
recmesh_gateway_request_seconds_bucket{api="http",le="0.1",route="/v1/events"} 30.0
# TYPE recmesh_gateway_outbox_depth gauge
recmesh_gateway_outbox_depth 42.0
"""


def test_parse_metrics_keeps_what_the_suite_needs() -> None:
    sample = parse_metrics(EXPOSITION, t=12.5, load1=0.7)
    assert sample.up and sample.t == 12.5 and sample.load1 == 0.7
    assert sample.breaker == {"ranking": 2.0, "quota": 0.0}
    assert sample.opened == {"ranking": 3.0}
    assert sample.attempts == {"ranking": 100.0}, "summed over status codes"
    assert sample.retries == {"ranking": 4.0}
    assert sample.rejected == {"ranking": 8.0}
    assert sample.requests == 125.0, "HTTP recommendations of every status"
    assert sample.outbox == 42.0
    assert sample.latency_buckets == {"0.05": 100.0, "0.1": 118.0, "+Inf": 125.0}
