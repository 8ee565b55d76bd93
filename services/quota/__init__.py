"""Per-tenant rate limits on Redis, for the gateway and for Envoy's rate-limit filter."""
