"""What the fuzz tests sent and what came back, for the summary at the end of the run."""

from __future__ import annotations

from collections import Counter

CASES: Counter[tuple[str, str]] = Counter()
"""Calls sent, by (method, input class); a streaming call counts once."""

CODES: Counter[tuple[str, str]] = Counter()
"""Answers, by (method, status code name)."""


def record(method: str, kind: str, code: str) -> None:
    """Count one call of ``method`` with an input of class ``kind`` answered ``code``."""
    CASES[method, kind] += 1
    CODES[method, code] += 1


def summary() -> list[str]:
    """One line of totals, then one per method: cases by input class and the answers."""
    if not CASES:
        return []
    methods = sorted({method for method, _ in CASES})
    kinds = sorted({kind for _, kind in CASES})
    per_kind = {kind: sum(n for (_, k), n in CASES.items() if k == kind) for kind in kinds}
    lines = [
        f"fuzz: {sum(CASES.values())} cases over {len(methods)} methods ("
        + ", ".join(f"{kind} {n}" for kind, n in per_kind.items())
        + ")"
    ]
    for method in methods:
        by_kind = " ".join(f"{kind}={CASES[method, kind]}" for kind in kinds)
        codes = " ".join(f"{code}={n}" for (m, code), n in sorted(CODES.items()) if m == method)
        lines.append(f"  {method}: {by_kind} -> {codes}")
    return lines
