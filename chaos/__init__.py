"""The chaos suite: break the running mesh under steady load and measure what users see.

``chaos.run`` drives a run (``recmesh chaos``, ``make chaos``), ``chaos.control`` acts on
the mesh's processes and starts the suite's own, ``chaos.load`` is the locust load generator
it starts as a separate process, ``chaos.observe`` scrapes the gateway and the processes'
health, ``chaos.timeline`` turns the observations into per-second timelines,
``chaos.figures`` into each scenario's figures, ``chaos.bars`` judges them,
``chaos.render`` writes the Markdown and JSON reports and ``chaos.plot`` draws them.
"""
