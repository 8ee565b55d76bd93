"""Two-tower retrieval model: user and item towers with L2-normalised embeddings.

Serving ranks items by ``<u, v>`` (cosine: both embeddings are unit-norm). The towers are
linear maps by default (``hidden_layers=0``); MLP towers are one setting away, and measured
worse on the default world (the ground-truth click logit is bilinear in the hidden
factors that the features project linearly; see ``docs/models.md``). The user tower reads
the shipped user vector (profile + history summary); the item tower reads item
features plus a category one-hot (:func:`training.features.item_tower_inputs`).

Training minimises the sum of two losses, one step of each per optimiser step:

* **Pointwise click loss** on every logged train impression (shown items, clicked or
  not): ``BCE(sigmoid(scale * <u, v> + bias), clicked)`` with learnt ``scale`` and
  ``bias``. Its target, P(click | shown), is what retrieval should rank by, and it is free
  of exposure bias given the features.
* **Sampled softmax** (weight ``softmax_weight``) over train clicks. A batch's columns are
  the batch's clicked items (in-batch negatives) plus ``random_negatives`` items drawn
  uniformly from the catalogue (mixed negative sampling). The logit of user i for column
  item j is::

      <u_i, v_j> / temperature  -  log(B * q_j + R / N)  +  log e(u_i, j)

  ``log(B q_j + R/N)`` is the log-Q correction for the mixed proposal (q_j = j's share of
  train clicks, B in-batch rows, R uniform draws over N items): it removes the sampling
  bias of the negatives. ``log e(u, j)`` is an estimated exposure propensity: the user's
  share of impressions in j's category times j's share of its category's impressions.
  The click distribution the softmax fits is exposure times P(click | shown); adding the
  exposure term in training leaves ``<u, v>`` to model P(click | shown). Without it the
  model learns what the logging policy showed (measured: it over-weights popularity and the
  user's favourite categories). Other rows' copies of row i's item are masked out.

**Leave-one-out click inputs** (``leave_one_out_clicks``, issue 19). One item feature is
the item's train click count, and it counts the clicks of the very impressions the model
trains on: an item shown once and clicked has count 1, one shown once and not clicked
count 0. Where most items have few impressions (1,000,000 items, 500k impressions) the
column is then nearly the label (train exploration impressions: click rate 0.59 on items
with a train click, 0 on the rest; held out: 0.14 against 0.10), and a tower trained on it
ranks by "was clicked in train". In training each impression's item gets the column
without that impression's own click, and each softmax positive without one click; served
embeddings use the full count. Measured (``docs/models.md``, issue 19): recall@100 at 1M
items 0.694 -> 0.836 x oracle; at 20k items, where items have many impressions, it costs
0.2 % (0.793 -> 0.792 x oracle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn
from tqdm import tqdm

from training.features import ClickColumn
from training.torch_common import infer, late_decay, mlp, seed_torch
from training.world import Interactions

EXPOSURE_SMOOTHING = 0.3
"""Pseudo-impressions per category in a user's estimated category exposure share."""


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyper-parameters of the two-tower model and its training."""

    embedding_dim: int = 64
    hidden_layers: int = 0
    """Hidden layers per tower; 0 makes each tower one linear map."""
    hidden_dim: int = 128
    temperature: float = 0.2
    """Softmax temperature; the pointwise loss learns its own scale, initialised to 1/T."""
    batch_size: int = 1024
    """Clicks per softmax batch; each step also takes one share of the impressions."""
    random_negatives: int = 256
    softmax_weight: float = 0.3
    category_one_hot: bool = True
    """Give the item tower the category one-hot besides the item features."""
    epochs: int = 5
    learning_rate: float = 5e-3
    log_q_correction: bool = True
    """Subtract ``log(B q_j + R / N)`` from the softmax logits (off only for ablations)."""
    leave_one_out_clicks: bool = True
    """In training, give each impression's item its train-click column without that
    impression's own click (and each softmax positive without one click), when
    :func:`train_two_tower` is told where the column is."""


class Tower(nn.Module):
    """Features to an L2-normalised embedding, ``[B, F] -> [B, D]``, through
    ``hidden_layers`` ReLU layers of width ``hidden_dim`` (none: one linear map)."""

    def __init__(
        self, feature_dim: int, hidden_dim: int, embedding_dim: int, hidden_layers: int = 2
    ) -> None:
        super().__init__()
        self.net = mlp([feature_dim, *([hidden_dim] * hidden_layers), embedding_dim])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=-1)


class TwoTower(nn.Module):
    """The pair of towers plus the pointwise loss's scale and bias."""

    def __init__(self, user_dim: int, item_dim: int, config: TwoTowerConfig) -> None:
        super().__init__()
        dims = (config.hidden_dim, config.embedding_dim, config.hidden_layers)
        self.user_tower = Tower(user_dim, *dims)
        self.item_tower = Tower(item_dim, *dims)
        self.scale = nn.Parameter(torch.tensor(1.0 / config.temperature))
        self.bias = nn.Parameter(torch.tensor(0.0))


@dataclass(frozen=True)
class _Tensors:
    """Training data as tensors: impressions, clicks, and the correction terms."""

    user_x: torch.Tensor
    item_x: torch.Tensor
    imp_users: torch.Tensor
    imp_items: torch.Tensor
    imp_clicked: torch.Tensor
    click_users: torch.Tensor
    click_items: torch.Tensor
    log_proposal: torch.Tensor
    """[N] log(B q_j + R / N)."""
    log_user_category: torch.Tensor
    """[n_users, n_categories] log of the user's estimated category exposure share."""
    log_item_in_category: torch.Tensor
    """[N] log of the item's share of its category's impressions."""
    categories: torch.Tensor
    click_column: int
    """Item-input column of the train-click count, -1 without leave-one-out inputs."""
    imp_click_value: torch.Tensor
    """[n_impressions] that column for the impression's item without its own click."""
    positive_click_value: torch.Tensor
    """[N] that column for the item with one click left out."""


def _tensors(
    user_features: NDArray[np.float32],
    item_inputs: NDArray[np.float32],
    logs: Interactions,
    item_categories: NDArray[np.int32],
    config: TwoTowerConfig,
    clicks_column: ClickColumn | None,
) -> _Tensors:
    n_users, n_items = user_features.shape[0], item_inputs.shape[0]
    n_categories = int(item_categories.max()) + 1
    clicks = logs.select(logs.clicked)
    q = np.bincount(clicks.items, minlength=n_items) / max(len(clicks), 1)
    batch = min(config.batch_size, max(len(clicks), 1))
    proposal = batch * q + config.random_negatives / n_items
    if not config.log_q_correction:
        proposal = np.ones_like(proposal)
    categories = item_categories.astype(np.int64)
    per_user = np.bincount(
        logs.users * n_categories + categories[logs.items], minlength=n_users * n_categories
    ).reshape(n_users, n_categories)
    share = (per_user + EXPOSURE_SMOOTHING) / (
        per_user.sum(axis=1, keepdims=True) + EXPOSURE_SMOOTHING * n_categories
    )
    per_item = np.bincount(logs.items, minlength=n_items) + 0.1
    per_category = np.bincount(categories, weights=per_item, minlength=n_categories)
    loo = clicks_column if config.leave_one_out_clicks else None
    items, empty = np.arange(n_items, dtype=np.int64), torch.zeros(0)
    return _Tensors(
        user_x=torch.from_numpy(user_features),
        item_x=torch.from_numpy(item_inputs),
        imp_users=torch.from_numpy(logs.users),
        imp_items=torch.from_numpy(logs.items),
        imp_clicked=torch.from_numpy(logs.clicked.astype(np.float32)),
        click_users=torch.from_numpy(clicks.users),
        click_items=torch.from_numpy(clicks.items),
        log_proposal=torch.from_numpy(np.log(np.maximum(proposal, 1e-12))).float(),
        log_user_category=torch.from_numpy(np.log(share)).float(),
        log_item_in_category=torch.from_numpy(np.log(per_item / per_category[categories])).float(),
        categories=torch.from_numpy(categories),
        click_column=-1 if loo is None else loo.column,
        imp_click_value=empty if loo is None else _values(loo, logs.items, logs.clicked),
        positive_click_value=empty if loo is None else _values(loo, items, np.ones(n_items)),
    )


def _values(column: ClickColumn, items: NDArray[np.int64], removed: NDArray[Any]) -> torch.Tensor:
    """The click column of ``items`` with ``removed`` clicks each left out."""
    return torch.from_numpy(column.without(items, removed.astype(np.int64)))


def _item_inputs(
    data: _Tensors, items: torch.Tensor, click_value: torch.Tensor | None
) -> torch.Tensor:
    """Item-tower inputs of ``items``, the click column replaced by ``click_value`` (its
    leave-one-out value) when leave-one-out inputs are on."""
    x = data.item_x[items]
    if data.click_column < 0 or click_value is None:
        return x
    x = x.clone()
    x[:, data.click_column] = click_value
    return x


def pointwise_loss(model: TwoTower, data: _Tensors, idx: torch.Tensor) -> torch.Tensor:
    """Mean BCE of ``scale * <u, v> + bias`` against the clicks of impressions ``idx``."""
    users = model.user_tower(data.user_x[data.imp_users[idx]])
    items = model.item_tower(
        _item_inputs(data, data.imp_items[idx], _take(data.imp_click_value, idx))
    )
    logits = model.scale * (users * items).sum(dim=-1) + model.bias
    return F.binary_cross_entropy_with_logits(logits, data.imp_clicked[idx])


def softmax_loss(
    model: TwoTower,
    data: _Tensors,
    idx: torch.Tensor,
    random_items: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy of clicks ``idx``; row i's positive is column i,
    the other columns are the other rows' items and then ``random_items``."""
    users, positives = data.click_users[idx], data.click_items[idx]
    columns = torch.cat([positives, random_items])
    user_emb = model.user_tower(data.user_x[users])
    click_value = None
    if data.click_column >= 0:
        click_value = torch.cat(
            [data.positive_click_value[positives], data.item_x[random_items, data.click_column]]
        )
    item_emb = model.item_tower(_item_inputs(data, columns, click_value))
    logits = user_emb @ item_emb.T / temperature - data.log_proposal[columns][None, :]
    exposure = data.log_user_category[users][:, data.categories[columns]]
    logits = logits + exposure + data.log_item_in_category[columns][None, :]
    duplicate = positives[:, None] == columns[None, :]
    rows = torch.arange(positives.shape[0])
    duplicate[rows, rows] = False
    logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, rows)


def train_two_tower(
    user_features: NDArray[np.float32],
    item_inputs: NDArray[np.float32],
    logs: Interactions,
    item_categories: NDArray[np.int32],
    config: TwoTowerConfig,
    *,
    seed: int,
    progress: bool = True,
    clicks_column: ClickColumn | None = None,
) -> TwoTower:
    """Train on the logged impressions ``logs`` (row ids into the feature matrices).

    ``clicks_column`` says where the item inputs hold the train-click count (the first
    columns of ``item_inputs`` are the item features); with it and
    ``config.leave_one_out_clicks``, training inputs leave out each example's own click.
    Returns the model in eval mode. Deterministic in ``seed`` and the inputs.
    """
    generator = seed_torch(seed)
    data = _tensors(user_features, item_inputs, logs, item_categories, config, clicks_column)
    model = TwoTower(user_features.shape[1], item_inputs.shape[1], config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    n_clicks, n_impressions = data.click_items.shape[0], data.imp_items.shape[0]
    batch = min(config.batch_size, max(n_clicks, 1))
    steps_per_epoch = max(1, n_clicks // batch)
    imp_batch = max(1, n_impressions // steps_per_epoch)
    steps = config.epochs * steps_per_epoch
    scheduler = late_decay(optimiser, steps)
    n_items = item_inputs.shape[0]
    model.train()
    with tqdm(total=steps, desc="two-tower", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            click_order = torch.randperm(n_clicks, generator=generator)
            imp_order = torch.randperm(n_impressions, generator=generator)
            for step in range(steps_per_epoch):
                loss = pointwise_loss(model, data, imp_order[step * imp_batch :][:imp_batch])
                if config.softmax_weight > 0 and n_clicks > 1:
                    random_items = torch.randint(
                        0, n_items, (config.random_negatives,), generator=generator
                    )
                    idx = click_order[step * batch : (step + 1) * batch]
                    sampled = softmax_loss(model, data, idx, random_items, config.temperature)
                    loss = loss + config.softmax_weight * sampled
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                optimiser.step()
                scheduler.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    return model.eval()


def _take(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    return values[idx] if values.numel() else None


def embed(tower: Tower, features: NDArray[np.float32]) -> NDArray[np.float32]:
    """Embeddings ``[N, D]`` float32 of every row of ``features``."""
    return infer(tower, features)
