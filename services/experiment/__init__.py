"""Experiment service: GrowthBook-compatible assignment of users to experiment variants."""
