"""The shared floor: what serving and training, and the gateway and a service, both need.

Above the generated contracts and :mod:`mesh`, below ``training``, the services and the
gateway (the import-linter contracts in ``pyproject.toml`` hold every package to it):

* :mod:`core.artifacts` — the versioned artifact-set format: write, read, verify, ``current``;
* :mod:`core.prerank` — the numpy form of the pre-rank model (training writes it, ranking scores);
* :mod:`core.experiments` — the experiment book and GrowthBook-compatible assignment;
* :mod:`core.validation`, :mod:`core.events` — request and event checks shared by the
  gateway and the services.

Nothing here imports torch, a servicer or a process entry point.
"""
