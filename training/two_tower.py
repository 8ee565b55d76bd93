"""Two-tower retrieval model: user and item MLP towers with L2-normalised embeddings.

Training objective: in-batch sampled softmax over (user, clicked item) pairs. For a batch
of B pairs the logits are ``<u_i, v_j> / temperature - log q_j`` where ``q_j`` is the
probability of item j appearing in a batch (its share of train clicks). This log-Q
correction removes the popularity bias of in-batch negatives, so the model estimates the
full softmax. Other rows holding the same item as row i are masked out of row i's
negatives. Serving ranks items by ``<u, v>``; embeddings are unit-norm so inner product is
cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn
from tqdm import tqdm

from training.torch_common import infer, mlp, n_batches, seed_torch, shuffled_batches


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyper-parameters of the two-tower model and its training."""

    embedding_dim: int = 64
    hidden_dim: int = 128
    temperature: float = 0.1
    batch_size: int = 1024
    epochs: int = 3
    learning_rate: float = 3e-3


class Tower(nn.Module):
    """MLP from dense features to an L2-normalised embedding; ``[B, F] -> [B, D]``."""

    def __init__(self, feature_dim: int, hidden_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.net = mlp([feature_dim, hidden_dim, hidden_dim, embedding_dim])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=-1)


class TwoTower(nn.Module):
    """The pair of towers. Only their outputs are used; there is no joint forward."""

    def __init__(self, user_dim: int, item_dim: int, config: TwoTowerConfig) -> None:
        super().__init__()
        self.user_tower = Tower(user_dim, config.hidden_dim, config.embedding_dim)
        self.item_tower = Tower(item_dim, config.hidden_dim, config.embedding_dim)


def in_batch_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Mean in-batch softmax cross-entropy with log-Q correction; row i's positive is
    column i. ``log_q`` holds the log sampling probability of each column's item."""
    logits = user_emb @ item_emb.T / temperature - log_q[None, :]
    duplicate = item_ids[None, :] == item_ids[:, None]
    duplicate.fill_diagonal_(False)
    logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, torch.arange(logits.shape[0]))


def train_two_tower(
    user_features: NDArray[np.float32],
    item_features: NDArray[np.float32],
    users: NDArray[np.int64],
    items: NDArray[np.int64],
    config: TwoTowerConfig,
    *,
    seed: int,
    progress: bool = True,
) -> TwoTower:
    """Train on positive pairs ``(users[k], items[k])`` (row ids into the feature matrices).

    Returns the model in eval mode. Deterministic in ``seed`` and the inputs.
    """
    generator = seed_torch(seed)
    model = TwoTower(user_features.shape[1], item_features.shape[1], config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    counts = np.bincount(items, minlength=item_features.shape[0]).astype(np.float64)
    log_q_all = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum())).float()
    u_feat, i_feat = torch.from_numpy(user_features), torch.from_numpy(item_features)
    u_ids, i_ids = torch.from_numpy(users), torch.from_numpy(items)
    batch_size = min(config.batch_size, users.shape[0])
    steps = config.epochs * n_batches(users.shape[0], batch_size)
    model.train()
    with tqdm(total=steps, desc="two-tower", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            for idx in shuffled_batches(users.shape[0], batch_size, generator):
                batch_items = i_ids[idx]
                loss = in_batch_loss(
                    model.user_tower(u_feat[u_ids[idx]]),
                    model.item_tower(i_feat[batch_items]),
                    batch_items,
                    log_q_all[batch_items],
                    config.temperature,
                )
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                optimiser.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    return model.eval()


def embed(tower: Tower, features: NDArray[np.float32]) -> NDArray[np.float32]:
    """Embeddings ``[N, D]`` float32 of every row of ``features``."""
    return infer(tower, features)
