"""Locust against the gateway's gRPC API: ``locust -f loadtest/locustfile_grpc.py``.

Run from the project root; ``-H`` is the gateway's gRPC ``host:port``. The traffic, the
pace (users x ``--per-user-rate`` recommendations/s) and the options are those of
``loadtest/locustfile_http.py``; calls go to ``recmesh.gateway.v1.GatewayService``
(``Recommend``, clicks through ``LogEvents``) with the key in the ``x-api-key`` metadata::

    locust -f loadtest/locustfile_grpc.py --headless -u 50 -r 50 -t 60s -H 127.0.0.1:50050
"""

# locust patches the standard library for gevent when imported: keep it first.
from locust import events  # isort: skip

import grpc.experimental.gevent

from loadtest.users import GrpcShopper, install

# gRPC's own threads must cooperate with gevent's before any channel exists.
grpc.experimental.gevent.init_gevent()


class RecommendGrpcUser(GrpcShopper):
    """Calls ``Recommend`` and sends clicks with ``LogEvents``."""


install(events, RecommendGrpcUser)
