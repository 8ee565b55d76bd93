"""The live-index benchmark runs end to end on a small set and writes its block."""

from __future__ import annotations

from pathlib import Path

from loadtest.catalog_index import main


def test_the_benchmark_writes_its_figures(artifacts_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "catalog_index.md"
    out.write_text("# prose kept\n\n<!-- catalog-index: begin -->\n<!-- catalog-index: end -->\n")
    argv = ["--artifacts", str(artifacts_root), "--churn", "0.7", "--queries", "50"]
    assert main([*argv, "--latency-queries", "60", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# prose kept")
    # The session set's index is flat: every index finds the exact top 100.
    assert "| the set's index | as trained | 1.0000 |" in text
    assert "| live: set index, deletions hidden, + delta | churned | 1.0000 |" in text
    assert "the live index finds 1.0000 of those" in text
    for row in ("upsert an id the delta holds (replace)", "live, delta 1,400, nothing hidden"):
        assert row in text
    assert text.count("<!-- catalog-index: begin -->") == 1
