"""The event logger: an idempotent per-tenant log on Redis Streams."""
