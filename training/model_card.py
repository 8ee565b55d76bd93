"""The model card of an artifact set (``model_card.md``, manifest file key ``model_card``).

A short, generated account of a set for whoever serves or audits it: what the models are
for, what they were trained on (from the manifest's ``config``), the set's metrics at its
own scale next to the issue-19 targets, and the known limits. The benchmark of record at
both scales (20k and 1M items) is in ``docs/models.md``; a set's card holds the figures it
was evaluated with, so it never quotes numbers it did not measure.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_CARD = "model_card.md"
"""File name of the card in a set."""

_ROWS = (
    ("two-tower recall@100", "retrieval.recall@100"),
    ("popularity recall@100", "retrieval.popularity_recall@100"),
    ("oracle recall@100", "retrieval.oracle_recall@100"),
    ("heavy ranker AUC click / conversion", "ranking.auc.click", "ranking.auc.conversion"),
    ("pre-ranker AUC click", "ranking.auc.prerank_click"),
    ("heavy ranker exploration AUC click", "ranking.explore_auc.click"),
    ("NDCG@10 heavy / pre-rank", "ranking.ndcg@10.heavy", "ranking.ndcg@10.prerank"),
    ("NDCG@10 feature-limited oracle", "ranking.ndcg@10.feature_oracle"),
)

LIMITS = (
    "Trained on a synthetic world (training/world.py), not on production traffic; the "
    "metrics are expectations under that world's ground truth.",
    "The ranker scores P(click | shown) and P(click and conversion | shown) for the "
    "candidates retrieval hands it; it is not calibrated for items or users outside the "
    "set (unknown users get the mean row).",
    "The item click-count feature is computed at the training cut; items that gain "
    "clicks later keep their old value until the next set.",
    "The pre-ranker's bilinear form cannot represent per-category preferences (the "
    "category is an 8-d code there); it only trims candidates for the heavy ranker.",
)


def _fmt(metrics: Mapping[str, float], keys: tuple[str, ...]) -> str:
    values = [metrics.get(k) for k in keys]
    return " / ".join("-" if v is None else f"{v:.4f}" for v in values)


def model_card(config: Mapping[str, Any], metrics: Mapping[str, float]) -> str:
    """The card's markdown for a set with manifest ``config`` and ``metrics``."""
    data = config.get("training_data", {})
    log = config.get("from_log")
    lines = [
        "# Model card",
        "",
        "## Intended use",
        "",
        "Candidate retrieval (two-tower + ANN index), pre-ranking and ranking (multi-task "
        f"heavy ranker, heads {', '.join(config.get('ranker_heads', []))}) for the RecMesh "
        "serving mesh's recommendation path, on the catalogue and users this set was "
        "built for. Offline evaluation and benchmarking of the mesh.",
        "",
        "## Training data",
        "",
        f"- world: {config.get('n_users')} users, {config.get('n_items')} items, "
        f"{config.get('n_categories')} categories, data seed {data.get('data_seed', '-')}",
    ]
    if data:
        lines.append(
            f"- {data['train_impressions']} train impressions ({data['train_clicks']} clicks, "
            f"{data['train_conversions']} conversions, {data['exploration_impressions']} "
            f"exploration); ranker examples sha256 {data['ranker_examples_sha256'][:16]}…"
        )
    if log:
        lines.append(
            f"- ranker trained from the log of {log['tenant']!r}, positions "
            f"{log['first_position']} .. {log['last_position']}, examples sha256 "
            f"{log['examples_sha256'][:16]}…, on base set {log['base_version']}"
        )
    ranker = config.get("ranker", {})
    lines += [
        f"- ranker: {ranker.get('epochs')} epochs, loss balance "
        f"{ranker.get('loss_balance', 'sum')}, PCGrad {ranker.get('pcgrad', False)}, "
        f"leave-one-out click count {ranker.get('leave_one_out', False)}",
        "",
        f"## Metrics ({config.get('n_items')} items; both scales: docs/models.md)",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {row[0]} | {_fmt(metrics, row[1:])} |" for row in _ROWS]
    else:
        lines.append("(not evaluated: built with --no-eval)")
    lines += ["", "## Known limits", ""]
    lines += [f"- {limit}" for limit in LIMITS]
    return "\n".join(lines) + "\n"


def write_model_card(path: Path, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Write :func:`model_card` to ``path``."""
    path.write_text(model_card(config, metrics))
