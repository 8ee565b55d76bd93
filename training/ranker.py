"""Multi-task heavy ranker: MMoE plus a wide bilinear part, with ESMM-style heads.

``forward(user_features [B, U], item_features [B, I]) -> [B, 2]`` probabilities in
:data:`HEADS` order: P(click) and P(click and conversion), per impression.

* **Inputs.** The item side is the item features plus the item's category as a one-hot,
  decoded inside the model from the category block of the item features
  (:class:`CategoryDecoder`, nearest category code), so the served inputs stay
  ``user_features`` and ``item_features``.
* **Deep part:** a multi-gate mixture of experts (MMoE) over ``concat(u, x, (u Wu) * (x Wi))``,
  one softmax gate and one small tower per task.
* **Wide part:** per task, a rank-``wide_rank`` bilinear term ``(u Bu) . (x Bi)`` plus
  linear terms in ``u`` and ``x``. The world's click and conversion logits are bilinear
  in hidden factors that the features project linearly; the MLP experts alone learn that
  slowly (measured: held-out conversion AUC 0.758 without the wide part, 0.780 with it).
* **Heads (ESMM):** task logits ``c`` (click) and ``v`` (conversion given click) are the sum
  of the two parts; ``P(click) = sigmoid(c)``, ``P(click and conversion) = sigmoid(c) *
  sigmoid(v)``. Both heads train on every impression (the second on "clicked and converted"),
  so the conversion tower never learns from the click-selected subset alone.

Training data (:func:`ranking_examples`) is the logged train impressions; those of the
exploration slice (uniformly random items, free of exposure bias, and the only view of
the tail items that retrieval hands the ranker) weigh ``exploration_weight`` times more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn
from tqdm import tqdm

from training.features import CategoryCodes
from training.torch_common import late_decay, mlp, n_batches, seed_torch, shuffled_batches
from training.world import Interactions

HEADS: tuple[str, ...] = ("click", "conversion")
"""Head order of the ranker's output columns."""

DECODER_MARGIN = 30.0
"""Log-odds by which the decoder prefers the nearest category code over the next nearest."""


@dataclass(frozen=True)
class RankerConfig:
    """Hyper-parameters of the ranker and its training."""

    n_experts: int = 3
    expert_dim: int = 64
    tower_dim: int = 32
    interaction_dim: int = 32
    """Width of the learnt projected interaction ``(u @ Wu) * (x @ Wi)`` fed to the experts."""
    wide_rank: int = 64
    """Rank of each task's wide bilinear term (0: no wide part)."""
    category_one_hot: bool = True
    """Decode the category one-hot from the item features (the pipeline passes the codes)."""
    batch_size: int = 2048
    epochs: int = 3
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    exploration_weight: float = 1.0
    """Loss weight of exploration-slice impressions relative to the others."""


@dataclass(frozen=True)
class RankingExamples:
    """Aligned training rows: user ids, item ids, labels ``[M, H]`` (float32 0/1) and
    per-row loss weights ``[M]``."""

    users: NDArray[np.int64]
    items: NDArray[np.int64]
    labels: NDArray[np.float32]
    weights: NDArray[np.float32]


class CategoryDecoder(nn.Module):
    """Item features ``[B, I]`` to a (numerically) one-hot category ``[B, C]``: a softmax
    over negative squared distances between the category block and each category's code."""

    codes: torch.Tensor

    def __init__(self, codes: CategoryCodes) -> None:
        super().__init__()
        self.start, self.stop = codes.start, codes.stop
        table = torch.from_numpy(codes.codes)
        gaps = torch.cdist(table, table).pow(2) + torch.eye(table.shape[0]) * 1e9
        sharpness = DECODER_MARGIN / max(float(gaps.min()), 1e-6) if table.shape[0] > 1 else 1.0
        self.register_buffer("codes", table)
        self.sharpness = sharpness

    @property
    def n_categories(self) -> int:
        return int(self.codes.shape[0])

    def forward(self, item_features: torch.Tensor) -> torch.Tensor:
        block = item_features[:, self.start : self.stop]
        distance = (block.unsqueeze(1) - self.codes.unsqueeze(0)).pow(2).sum(dim=-1)
        return torch.softmax(-self.sharpness * distance, dim=-1)


class MultiTaskRanker(nn.Module):
    """The ranker; ``forward(user_features [B, U], item_features [B, I]) -> [B, H]``.

    ``codes`` (optional) enables the category one-hot on the item side."""

    def __init__(
        self,
        user_dim: int,
        item_dim: int,
        config: RankerConfig,
        codes: CategoryCodes | None = None,
    ) -> None:
        super().__init__()
        self.decoder = CategoryDecoder(codes) if codes is not None else None
        item_in = item_dim + (self.decoder.n_categories if self.decoder is not None else 0)
        self.user_proj = nn.Linear(user_dim, config.interaction_dim, bias=False)
        self.item_proj = nn.Linear(item_in, config.interaction_dim, bias=False)
        in_dim = user_dim + item_in + config.interaction_dim
        self.experts = nn.ModuleList(
            mlp([in_dim, config.expert_dim, config.expert_dim]) for _ in range(config.n_experts)
        )
        self.gates = nn.ModuleList(nn.Linear(in_dim, config.n_experts) for _ in HEADS)
        self.towers = nn.ModuleList(mlp([config.expert_dim, config.tower_dim, 1]) for _ in HEADS)
        self.rank = config.wide_rank
        if self.rank > 0:
            self.wide_user = nn.Linear(user_dim, config.wide_rank * len(HEADS), bias=False)
            self.wide_item = nn.Linear(item_in, config.wide_rank * len(HEADS), bias=False)
        self.linear_user = nn.Linear(user_dim, len(HEADS))
        self.linear_item = nn.Linear(item_in, len(HEADS), bias=False)

    def logits(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """Task logits ``[B, 2]``: click, and conversion given click."""
        u, x = user_features, item_features
        if self.decoder is not None:
            x = torch.cat([x, self.decoder(x)], dim=-1)
        deep_in = torch.cat([u, x, self.user_proj(u) * self.item_proj(x)], dim=-1)
        experts = torch.stack([F.relu(e(deep_in)) for e in self.experts], dim=1)  # [B, E, De]
        deep = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            weights = torch.softmax(gate(deep_in), dim=-1).unsqueeze(-1)  # [B, E, 1]
            deep.append(tower((weights * experts).sum(dim=1)))
        wide: torch.Tensor = self.linear_user(u) + self.linear_item(x)
        if self.rank > 0:
            heads = len(HEADS)
            left = self.wide_user(u).view(-1, heads, self.rank)
            wide = wide + (left * self.wide_item(x).view(-1, heads, self.rank)).sum(dim=-1)
        return torch.cat(deep, dim=-1) + wide

    def log_probs(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """Log head probabilities ``[B, H]``: log P(click), log P(click and conversion)."""
        logits = self.logits(user_features, item_features)
        click = F.logsigmoid(logits[:, 0])
        return torch.stack([click, click + F.logsigmoid(logits[:, 1])], dim=-1)

    def forward(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(self.logits(user_features, item_features))
        out: torch.Tensor = torch.stack([probs[:, 0], probs[:, 0] * probs[:, 1]], dim=-1)
        return out


def ranking_examples(logs: Interactions, exploration_weight: float) -> RankingExamples:
    """Every impression of ``logs``, labelled (clicked, converted), weighted by slice."""
    labels = np.stack([logs.clicked, logs.converted], axis=1).astype(np.float32)
    weights = np.where(logs.explored, exploration_weight, 1.0).astype(np.float32)
    return RankingExamples(users=logs.users, items=logs.items, labels=labels, weights=weights)


def head_loss(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row binary cross-entropy summed over heads, from log probabilities ``[B, H]``."""
    log_probs = log_probs.clamp(max=-1e-7)
    log_not = torch.log(-torch.expm1(log_probs))
    return -(labels * log_probs + (1.0 - labels) * log_not).sum(dim=-1)


def train_ranker(
    user_features: NDArray[np.float32],
    item_features: NDArray[np.float32],
    examples: RankingExamples,
    config: RankerConfig,
    *,
    seed: int,
    codes: CategoryCodes | None = None,
    progress: bool = True,
) -> MultiTaskRanker:
    """Train with the weighted per-head binary cross-entropy; returns the model in eval mode."""
    generator = seed_torch(seed)
    model = MultiTaskRanker(user_features.shape[1], item_features.shape[1], config, codes)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    u_feat, i_feat = torch.from_numpy(user_features), torch.from_numpy(item_features)
    u_ids, i_ids = torch.from_numpy(examples.users), torch.from_numpy(examples.items)
    labels, weights = torch.from_numpy(examples.labels), torch.from_numpy(examples.weights)
    n = labels.shape[0]
    batch_size = min(config.batch_size, n)
    steps = config.epochs * n_batches(n, batch_size)
    scheduler = late_decay(optimiser, steps)
    model.train()
    with tqdm(total=steps, desc="ranker", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            for idx in shuffled_batches(n, batch_size, generator):
                log_probs = model.log_probs(u_feat[u_ids[idx]], i_feat[i_ids[idx]])
                w = weights[idx]
                loss = (head_loss(log_probs, labels[idx]) * w).sum() / w.sum()
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                optimiser.step()
                scheduler.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    return model.eval()
