"""Load generation and benchmarks against the mesh (and the monolith baseline).

``traffic`` is the shared traffic model (users, tenants, clicks, pace, records);
``users`` the locust users of the HTTP and gRPC APIs, which ``locustfile_http.py`` and
``locustfile_grpc.py`` expose to ``locust -f``; ``harness`` starts targets for a run;
``steps`` (``make bench``) is the throughput benchmark and ``step_report`` its figures;
``bench`` the per-stage latency benchmark and ``stage_report`` its figures; ``reporting``
(percentiles, Markdown tables, the run section) and ``runs`` (artifact options, run
directories) what the benchmarks share; ``monolith`` the one-process baseline.
"""
