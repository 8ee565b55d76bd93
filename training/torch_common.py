"""Shared torch plumbing for the trainers: determinism, MLP blocks, batching, inference.

Determinism contract: after :func:`seed_torch` with the same seed and thread count, the
trainers in this package produce bit-identical weights on the same machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

TRAIN_THREADS = 1
"""Torch intra-op threads while training. One thread keeps float reductions in a fixed order
(same seed, same weights) and is nearly as fast as two for models this small."""


def seed_torch(seed: int) -> torch.Generator:
    """Make torch deterministic and single-threaded (process-wide settings), seed it, and
    return a generator for batch shuffling."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(TRAIN_THREADS)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers through ``dims`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(dims)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors covering ``range(n)`` in a random order, ``batch_size`` at a time.

    The final short batch is dropped when a full one exists, so in-batch softmax always sees
    full batches."""
    order = torch.randperm(n, generator=generator)
    n_batches = max(1, n // batch_size)
    for b in range(n_batches):
        yield order[b * batch_size : (b + 1) * batch_size]


def n_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`shuffled_batches` yields for ``n`` rows."""
    return max(1, n // batch_size)


def infer(
    fn: Callable[[torch.Tensor], torch.Tensor],
    features: NDArray[np.float32],
    batch_size: int = 65536,
) -> NDArray[np.float32]:
    """Apply ``fn`` to row batches of ``features`` without autograd; concatenated float32."""
    out = []
    with torch.no_grad():
        for start in range(0, features.shape[0], batch_size):
            batch = torch.from_numpy(features[start : start + batch_size])
            out.append(fn(batch).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def late_decay(optimiser: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate schedule over ``steps`` optimiser steps: the full rate for the first
    half, then linear decay towards zero (call ``step()`` after each optimiser step)."""
    total = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, 2.0 * (1.0 - step / total))
    )
