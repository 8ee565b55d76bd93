"""A benchmark's generated block in a hand-written Markdown file: rewritten in place, the
prose and other blocks around it kept."""

from __future__ import annotations

from pathlib import Path

from loadtest.reporting import write_block


def test_block_is_appended_then_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nProse.\n", encoding="utf-8")

    write_block(doc, "bench", ["first"])
    doc.write_text(doc.read_text(encoding="utf-8") + "\nMore prose.\n", encoding="utf-8")
    write_block(doc, "other", ["theirs"])
    write_block(doc, "bench", ["second", "run"])

    assert doc.read_text(encoding="utf-8") == (
        "# Title\n\nProse.\n\n"
        "<!-- bench: begin -->\nsecond\nrun\n<!-- bench: end -->\n"
        "\nMore prose.\n\n"
        "<!-- other: begin -->\ntheirs\n<!-- other: end -->\n"
    )


def test_missing_file_is_created(tmp_path: Path) -> None:
    doc = tmp_path / "new.md"

    write_block(doc, "bench", ["only"])

    assert doc.read_text(encoding="utf-8") == "<!-- bench: begin -->\nonly\n<!-- bench: end -->\n"
