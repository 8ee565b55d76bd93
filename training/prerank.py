"""Training of the bilinear pre-ranker (see :mod:`core.prerank` for the model).

Trained with binary cross-entropy on the click label of the ranker's examples (weighted like
the ranker's, and with the same leave-one-out item click-count column,
:class:`training.ranker.ClickColumn`); a scalar bias is learnt too but not exported, since
it does not change the order of scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from tqdm import tqdm

from core.prerank import PRERANK_ARRAYS
from training.ranker import RankingExamples
from training.torch_common import late_decay, n_batches, seed_torch, shuffled_batches


@dataclass(frozen=True)
class PrerankConfig:
    """Hyper-parameters of the pre-ranker and its training."""

    rank: int = 32
    """With the item width I = 32, rank 32 makes the bilinear form full-rank; serving cost
    does not depend on it (the user side folds into one I-vector per request)."""
    batch_size: int = 4096
    epochs: int = 8
    learning_rate: float = 1e-2


def train_prerank(
    user_features: NDArray[np.float32],
    item_features: NDArray[np.float32],
    examples: RankingExamples,
    config: PrerankConfig,
    *,
    seed: int,
    progress: bool = True,
) -> dict[str, NDArray[np.float32]]:
    """Train on the click column of ``examples.labels``; returns the arrays named in
    :data:`core.prerank.PRERANK_ARRAYS`."""
    generator = seed_torch(seed)
    user_dim, item_dim = user_features.shape[1], item_features.shape[1]
    user_proj = torch.nn.Parameter(torch.randn(user_dim, config.rank) / user_dim**0.5)
    item_proj = torch.nn.Parameter(torch.randn(item_dim, config.rank) / item_dim**0.5)
    item_bias = torch.nn.Parameter(torch.zeros(item_dim))
    bias = torch.nn.Parameter(torch.zeros(()))
    params = [user_proj, item_proj, item_bias, bias]
    optimiser = torch.optim.Adam(params, lr=config.learning_rate)
    u_feat, i_feat = torch.from_numpy(user_features), torch.from_numpy(item_features)
    u_ids = torch.from_numpy(examples.users)
    clicks = torch.from_numpy(np.ascontiguousarray(examples.labels[:, 0]))
    weights = torch.from_numpy(examples.weights)
    n = clicks.shape[0]
    batch_size = min(config.batch_size, n)
    steps = config.epochs * n_batches(n, batch_size)
    scheduler = late_decay(optimiser, steps)
    with tqdm(total=steps, desc="prerank", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            for idx in shuffled_batches(n, batch_size, generator):
                u, x = u_feat[u_ids[idx]], examples.item_rows(i_feat, idx)
                logits = ((u @ user_proj) * (x @ item_proj)).sum(-1) + x @ item_bias + bias
                w = weights[idx]
                loss = F.binary_cross_entropy_with_logits(logits, clicks[idx], weight=w)
                loss = loss * (w.shape[0] / w.sum())
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                optimiser.step()
                scheduler.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    trained = (user_proj, item_proj, item_bias)
    return {
        name: p.detach().numpy().astype(np.float32)
        for name, p in zip(PRERANK_ARRAYS, trained, strict=True)
    }
