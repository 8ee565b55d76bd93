"""Multi-task heavy ranker: a multi-gate mixture of experts (MMoE) with click and conversion heads.

Input per (user, item) pair is ``concat(u, x, u * x)`` when the user and item feature widths
match, else ``concat(u, x)``. Each head has its own softmax gate over shared experts and a
small tower ending in a sigmoid; ``forward`` returns probabilities ``[B, H]`` in
:data:`HEADS` order. The conversion head predicts P(click and conversion) per impression,
so both heads train on every impression.

Training data (:func:`ranking_examples`) is the world's logged train impressions plus an
exploration share: impressions of uniformly random items whose outcomes are drawn from
the world. Exploration shows the ranker the tail items that retrieval will hand it and
that the logging policy rarely showed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn
from tqdm import tqdm

from training.torch_common import mlp, n_batches, seed_torch, shuffled_batches
from training.world import World

HEADS: tuple[str, ...] = ("click", "conversion")
"""Head order of the ranker's output columns."""


@dataclass(frozen=True)
class RankerConfig:
    """Hyper-parameters of the ranker and its training."""

    n_experts: int = 3
    expert_dim: int = 64
    tower_dim: int = 32
    interaction_dim: int = 32
    """Width of the learnt projected interaction ``(u @ Wu) * (x @ Wi)``."""
    batch_size: int = 2048
    epochs: int = 3
    learning_rate: float = 3e-3
    exploration_share: float = 0.25
    """Exploration impressions added, as a share of the logged train impressions."""


@dataclass(frozen=True)
class RankingExamples:
    """Aligned training rows: user ids, item ids and labels ``[M, H]`` (float32 0/1)."""

    users: NDArray[np.int64]
    items: NDArray[np.int64]
    labels: NDArray[np.float32]


class MultiTaskRanker(nn.Module):
    """MMoE ranker; ``forward(user_features [B, U], item_features [B, I]) -> [B, H]``."""

    def __init__(self, user_dim: int, item_dim: int, config: RankerConfig) -> None:
        super().__init__()
        self.interact = user_dim == item_dim
        self.user_proj = nn.Linear(user_dim, config.interaction_dim, bias=False)
        self.item_proj = nn.Linear(item_dim, config.interaction_dim, bias=False)
        in_dim = user_dim + item_dim + (user_dim if self.interact else 0) + config.interaction_dim
        self.experts = nn.ModuleList(
            mlp([in_dim, config.expert_dim, config.expert_dim]) for _ in range(config.n_experts)
        )
        self.gates = nn.ModuleList(nn.Linear(in_dim, config.n_experts) for _ in HEADS)
        self.towers = nn.ModuleList(mlp([config.expert_dim, config.tower_dim, 1]) for _ in HEADS)

    def logits(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores ``[B, H]``."""
        parts = [user_features, item_features]
        if self.interact:
            parts.append(user_features * item_features)
        parts.append(self.user_proj(user_features) * self.item_proj(item_features))
        x = torch.cat(parts, dim=-1)
        experts = torch.stack([F.relu(e(x)) for e in self.experts], dim=1)  # [B, E, De]
        heads = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            weights = torch.softmax(gate(x), dim=-1).unsqueeze(-1)  # [B, E, 1]
            heads.append(tower((weights * experts).sum(dim=1)))
        return torch.cat(heads, dim=-1)

    def forward(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(user_features, item_features))


def ranking_examples(world: World, exploration_share: float, seed: int) -> RankingExamples:
    """Logged train impressions plus ``exploration_share`` as many exploration impressions
    (uniform random items for users drawn like the logs, outcomes drawn from the world)."""
    rng = np.random.default_rng(seed)
    train = world.train
    n_explore = round(len(train) * exploration_share)
    users = rng.choice(train.users, size=n_explore)
    items = rng.integers(0, world.config.n_items, size=n_explore, dtype=np.int64)
    clicked, converted = world.simulate(users, items, seed=int(rng.integers(2**31)))
    labels = np.stack(
        [np.concatenate([train.clicked, clicked]), np.concatenate([train.converted, converted])],
        axis=1,
    ).astype(np.float32)
    return RankingExamples(
        users=np.concatenate([train.users, users]),
        items=np.concatenate([train.items, items]),
        labels=labels,
    )


def train_ranker(
    user_features: NDArray[np.float32],
    item_features: NDArray[np.float32],
    examples: RankingExamples,
    config: RankerConfig,
    *,
    seed: int,
    progress: bool = True,
) -> MultiTaskRanker:
    """Train with the summed per-head binary cross-entropy; returns the model in eval mode."""
    generator = seed_torch(seed)
    model = MultiTaskRanker(user_features.shape[1], item_features.shape[1], config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    u_feat, i_feat = torch.from_numpy(user_features), torch.from_numpy(item_features)
    u_ids, i_ids = torch.from_numpy(examples.users), torch.from_numpy(examples.items)
    labels = torch.from_numpy(examples.labels)
    n = labels.shape[0]
    batch_size = min(config.batch_size, n)
    steps = config.epochs * n_batches(n, batch_size)
    model.train()
    with tqdm(total=steps, desc="ranker", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            for idx in shuffled_batches(n, batch_size, generator):
                logits = model.logits(u_feat[u_ids[idx]], i_feat[i_ids[idx]])
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx], reduction="sum")
                loss = loss / idx.shape[0]
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                optimiser.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    return model.eval()
