"""The experiment book (:mod:`core.experiments.book`) and its GrowthBook-compatible
assignment (:mod:`core.experiments.assign`, :mod:`core.experiments.growthbook`), shared by
the experiment service, which assigns, and the gateway, which falls back to the control
variants when that service is down; the statistics of experiment reports
(:mod:`core.experiments.stats`); and team-draft interleaving, its propensities and its
credit from clicks (:mod:`core.experiments.interleaving`, used by the ranking service and
the reports)."""
