"""The online feature store: user and item feature views on Redis."""
