"""The experiment book and its GrowthBook-compatible assignment (:mod:`core.experiments.book`),
shared by the experiment service, which assigns, and the gateway, which falls back to the
control variants when that service is down."""
