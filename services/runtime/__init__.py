"""What the model-serving services (retrieval, ranking) share: loading an artifact set's
models (:mod:`services.runtime.models`) and swapping a new set in under live traffic
(:mod:`services.runtime.artifact_watch`). Services import it; it imports no service."""
