"""Operator tooling: the `recmesh` command, process supervision, stub generation."""
