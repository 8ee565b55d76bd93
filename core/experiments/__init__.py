"""The experiment book (:mod:`core.experiments.book`) and its GrowthBook-compatible
assignment (:mod:`core.experiments.assign`, :mod:`core.experiments.growthbook`), shared by
the experiment service, which assigns, and the gateway, which falls back to the control
variants when that service is down."""
