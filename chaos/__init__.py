"""The chaos suite: break the running mesh under steady load and measure what users see.

``chaos.run`` drives a run (``recmesh chaos``, ``make chaos``), ``chaos.load`` is the
locust load generator it starts as a separate process, ``chaos.observe`` scrapes the
gateway and the processes' health, ``chaos.timeline`` and ``chaos.report`` turn the
observations into per-second timelines, figures and bars, ``chaos.plot`` draws them.
"""
