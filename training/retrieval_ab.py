"""Two-tower-only A/B runs for retrieval tuning (issue 19): ``python -m training.retrieval_ab``.

Trains the two-tower alone on a world (the pipeline's features and ``train_two_tower``
call) and prints, as one JSON line, the expected recall@K of exact search over its torch
embeddings, of train popularity and of the ground-truth oracle, with the same formula and
the same seeded evaluation users as :mod:`training.evaluate` (the pipeline's figures on
the exported ONNX agree to the printed digits). About 30 s at 20k items and 60 s at 1M
items on a quiet core, a quarter of a full ``train``.

``--config`` takes :class:`training.two_tower.TwoTowerConfig` fields as JSON, e.g.
``'{"leave_one_out_clicks": false}'`` or ``'{"random_negatives": 0}'``.
``--history-latent S`` appends a block measured in issue 19 and not kept: per user, the
mean latent-projection item features of their history events (clicks and policy
impressions, as in the category history), shrunk by ``S`` pseudo-events and standardised;
with ``--leave-own-event-out`` training sees it without the example's own event.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from training import two_tower
from training.evaluate import EvalConfig, _eval_users
from training.features import category_codes, click_column, item_tower_inputs, user_feature_matrix
from training.metrics import top_k
from training.world import SOURCE_POLICY, World, WorldConfig, generate_world

F32 = NDArray[np.float32]
KS = (50, 100, 500)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--users", type=int, default=2000, help="evaluation users")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help="TwoTowerConfig fields as JSON")
    parser.add_argument("--history-latent", type=float, default=None, metavar="S")
    parser.add_argument("--leave-own-event-out", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    world = generate_world(WorldConfig(n_items=args.items, seed=args.data_seed))
    config = two_tower.TwoTowerConfig(**json.loads(args.config))
    user_x = user_feature_matrix(world)
    if args.history_latent is not None:
        user_x = _with_history_latent(
            world, user_x, args.history_latent, leave_out=args.leave_own_event_out
        )
    inputs = item_tower_inputs(world, category_codes(world) if config.category_one_hot else None)
    trained = time.perf_counter()
    model = two_tower.train_two_tower(
        user_x,
        inputs,
        world.train,
        world.item_categories,
        config,
        seed=args.train_seed,
        progress=False,
        clicks_column=click_column(world),
    )
    train_s = time.perf_counter() - trained
    users = _eval_users(world, EvalConfig(max_users=args.users, seed=args.data_seed))
    recall = _recall(
        world,
        users,
        two_tower.embed(model.user_tower, user_x[users]),
        two_tower.embed(model.item_tower, inputs),
    )
    r, pop, oracle = recall["two_tower"][100], recall["popularity"][100], recall["oracle"][100]
    print(
        json.dumps(
            {
                "items": args.items,
                "config": json.loads(args.config),
                "history_latent": args.history_latent,
                "leave_own_event_out": args.leave_own_event_out,
                "train_seed": args.train_seed,
                "recall": {
                    name: {k: round(v, 7) for k, v in r_.items()} for name, r_ in recall.items()
                },
                "x_popularity@100": round(r / pop, 3),
                "x_oracle@100": round(r / oracle, 3),
                "two_tower_train_s": round(train_s, 1),
                "total_s": round(time.perf_counter() - started, 1),
            }
        )
    )


def _recall(
    world: World, users: NDArray[np.int64], user_emb: F32, item_emb: F32
) -> dict[str, dict[int, float]]:
    """Expected recall@K (:mod:`training.evaluate`'s formula, train clicks dropped) of the
    two-tower, train popularity and the oracle."""
    n_items = world.config.n_items
    clicks = world.train.select(world.train.clicked)
    popularity = np.bincount(clicks.items, minlength=n_items).astype(np.float32)
    row = np.searchsorted(users, clicks.users)
    known = (row < users.size) & (users[np.minimum(row, users.size - 1)] == clicks.users)
    seen_rows, seen_items = row[known], clicks.items[known]
    all_items = np.arange(n_items)
    parts: dict[str, dict[int, list[NDArray[np.float64]]]] = {
        name: {k: [] for k in KS} for name in ("two_tower", "popularity", "oracle")
    }
    chunk = max(1, (1 << 23) // n_items)
    for start in range(0, users.size, chunk):
        rows = np.arange(start, min(start + chunk, users.size))
        in_chunk = (seen_rows >= rows[0]) & (seen_rows <= rows[-1])
        mask = (seen_rows[in_chunk] - rows[0], seen_items[in_chunk])
        logits = world.truth.click_logit_matrix(users[rows], all_items)
        relevance = 1.0 / (1.0 + np.exp(-logits))
        relevance[mask] = 0.0
        total = relevance.sum(axis=1, dtype=np.float64)
        scores = {
            "two_tower": user_emb[rows] @ item_emb.T,
            "popularity": np.repeat(popularity[None, :], rows.size, axis=0),
            "oracle": logits,
        }
        for name, s in scores.items():
            s[mask] = -np.inf
            gained = np.cumsum(np.take_along_axis(relevance, top_k(s, max(KS)), axis=1), axis=1)
            for k in KS:
                parts[name][k].append(gained[:, min(k, gained.shape[1]) - 1] / total)
    return {
        name: {k: float(np.mean(np.concatenate(v))) for k, v in by_k.items()}
        for name, by_k in parts.items()
    }


def _with_history_latent(world: World, user_x: F32, shrink: float, *, leave_out: bool) -> F32:
    """``user_x`` with the (not kept) history-latent block appended; with ``leave_out``,
    training's loss functions see each example's block without its own event."""
    train = world.train
    weights = train.clicked.astype(np.float64) + (train.sources == SOURCE_POLICY)
    latent = world.item_features[:, : world.config.item_feature_dim - 10].astype(np.float64)
    n_users = world.config.n_users
    sums = np.zeros((n_users, latent.shape[1]))
    np.add.at(sums, train.users, latent[train.items] * weights[:, None])
    counts = np.bincount(train.users, weights=weights, minlength=n_users)
    mean = sums / (counts[:, None] + shrink)
    centre, scale = mean.mean(axis=0), mean.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    width = user_x.shape[1]

    def block(users: NDArray[np.int64], items: NDArray[np.int64], w: NDArray[np.float64]) -> F32:
        own = (sums[users] - w[:, None] * latent[items]) / (counts[users] - w + shrink)[:, None]
        return np.asarray((own - centre) / scale, dtype=np.float32)

    if leave_out:
        clicked = train.clicked
        imp_block = torch.from_numpy(block(train.users, train.items, weights))
        click_block = torch.from_numpy(
            block(train.users[clicked], train.items[clicked], weights[clicked])
        )
        _leave_own_event_out(width, imp_block, click_block)
    full = np.asarray((mean - centre) / scale, dtype=np.float32)
    return np.ascontiguousarray(np.concatenate([user_x, full], axis=1))


def _leave_own_event_out(width: int, imp_block: torch.Tensor, click_block: torch.Tensor) -> None:
    """Swap the trainer's loss functions (this process only) for copies whose user inputs
    are the first ``width`` user columns and then the example's own block."""

    def users_of(data: two_tower._Tensors, users: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return torch.cat([data.user_x[users][:, :width], own], dim=1)

    def pointwise_loss(
        model: two_tower.TwoTower, data: two_tower._Tensors, idx: torch.Tensor
    ) -> torch.Tensor:
        users = model.user_tower(users_of(data, data.imp_users[idx], imp_block[idx]))
        click_value = two_tower._take(data.imp_click_value, idx)
        items = model.item_tower(two_tower._item_inputs(data, data.imp_items[idx], click_value))
        logits = model.scale * (users * items).sum(dim=-1) + model.bias
        return F.binary_cross_entropy_with_logits(logits, data.imp_clicked[idx])

    def softmax_loss(
        model: two_tower.TwoTower,
        data: two_tower._Tensors,
        idx: torch.Tensor,
        random_items: torch.Tensor,
        temperature: float,
    ) -> torch.Tensor:
        users, positives = data.click_users[idx], data.click_items[idx]
        columns = torch.cat([positives, random_items])
        user_emb = model.user_tower(users_of(data, users, click_block[idx]))
        click_value = None
        if data.click_column >= 0:
            click_value = torch.cat(
                [data.positive_click_value[positives], data.item_x[random_items, data.click_column]]
            )
        item_emb = model.item_tower(two_tower._item_inputs(data, columns, click_value))
        logits = user_emb @ item_emb.T / temperature - data.log_proposal[columns][None, :]
        exposure = data.log_user_category[users][:, data.categories[columns]]
        logits = logits + exposure + data.log_item_in_category[columns][None, :]
        duplicate = positives[:, None] == columns[None, :]
        rows = torch.arange(positives.shape[0])
        duplicate[rows, rows] = False
        return F.cross_entropy(logits.masked_fill(duplicate, float("-inf")), rows)

    two_tower.pointwise_loss = pointwise_loss
    two_tower.softmax_loss = softmax_loss


if __name__ == "__main__":
    main()
