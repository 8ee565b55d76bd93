"""What the model-serving services (retrieval, ranking) share: loading an artifact set's
models (:mod:`services.runtime.models`), swapping a new set in under live traffic
(:mod:`services.runtime.artifact_watch`), and the user view's read
(:mod:`services.runtime.user_view`), which the feature service serves and retrieval does
in process. Services import it; it imports no service."""
