"""Locust against the gateway's HTTP API: ``locust -f loadtest/locustfile_http.py``.

Run from the project root. In the web UI the offered rate is users x ``--per-user-rate``
(0.5/s by default: 50 users offer 25 recommendations/s); headless at a fixed arrival rate::

    locust -f loadtest/locustfile_http.py --headless -u 50 -r 50 -t 60s \\
        -H http://127.0.0.1:8080 --tenant-keys loadtest/tenants.dev.json --record out.jsonl

Traffic (Zipf users of the served artifact set, weighted tenants, clicks after a think
time) comes from :mod:`loadtest.traffic`; ``locust -f ... --help`` lists its options.
"""

# locust patches the standard library for gevent when imported: keep it first.
from locust import events  # isort: skip

from loadtest.users import HttpShopper, install


class RecommendHttpUser(HttpShopper):
    """Asks ``POST /v1/recommend`` and posts clicks to ``POST /v1/events``."""


install(events, RecommendHttpUser)
