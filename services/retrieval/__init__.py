"""Candidate generation: two-tower ANN plus popularity, merged and filtered."""
