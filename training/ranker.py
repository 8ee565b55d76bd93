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

* **Leave-one-out click count** (issue 19). The item features' ``log(1 + train clicks)``
  column counts the clicks of the very impressions the ranker trains on: an item shown
  once in training has a count above the minimum exactly when that impression was
  clicked, so the column leaks the label. At 1M items (0.4 train impressions per item)
  the MLP experts learnt "count > 0 means click", which held-out impressions do not
  obey: held-out click AUC 0.674, below the bilinear pre-ranker's 0.745. Each example now
  carries the column with its own click left out (:class:`training.features.ClickColumn`),
  the value a new impression would be served with: AUC 0.789 at 1M, 0.795 at 20k.
* **Multi-task options** (measured by :mod:`training.mtl`, kept off): uncertainty
  weighting of the heads' losses, PCGrad on the shared parameters
  (:func:`shared_parameters`), one head alone; :class:`RankerTrace` records the cosine of
  the task gradients during training.
* **Inverse-propensity weights** (:func:`ipw_weights`, clipped and self-normalised) can
  multiply the example weights (``train --from-log`` does, from the logged propensities).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn
from tqdm import tqdm

from training.features import CategoryCodes, ClickColumn
from training.torch_common import late_decay, mlp, n_batches, seed_torch, shuffled_batches
from training.world import Interactions

F32 = NDArray[np.float32]

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
    leave_one_out: bool = True
    """Train on the item click-count column with each example's own click left out
    (:class:`ClickColumn`); without it the column leaks the label (see the module docstring)."""
    loss_balance: str = "sum"
    """How the heads' losses combine: ``"sum"`` (plain sum) or ``"uncertainty"`` (learnt
    homoscedastic weights, Kendall et al. 2018: ``sum_k exp(-s_k) L_k + s_k``)."""
    pcgrad: bool = False
    """Project conflicting task gradients on the shared parameters (PCGrad, Yu et al. 2020)."""
    trained_heads: tuple[str, ...] = HEADS
    """Heads whose loss trains the model (one head alone: the negative-transfer check)."""


@dataclass(frozen=True)
class RankingExamples:
    """Aligned training rows: user ids, item ids, labels ``[M, H]`` (float32 0/1) and
    per-row loss weights ``[M]``."""

    users: NDArray[np.int64]
    items: NDArray[np.int64]
    labels: NDArray[np.float32]
    weights: NDArray[np.float32]
    item_column: int = -1
    """Item feature column that ``item_values`` replaces per row (-1: none)."""
    item_values: NDArray[np.float32] | None = None
    """Per-row value of item feature ``item_column`` (the leave-one-out click count)."""

    def item_rows(self, item_features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The item feature rows of examples ``idx``, with the per-row column applied."""
        rows = item_features[torch.from_numpy(self.items)[idx]]
        if self.item_values is not None and self.item_column >= 0:
            rows[:, self.item_column] = torch.from_numpy(self.item_values)[idx]
        return rows


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


def ranking_examples(
    logs: Interactions,
    exploration_weight: float,
    *,
    clicks: ClickColumn | None = None,
    weights: F32 | None = None,
) -> RankingExamples:
    """Every impression of ``logs``, labelled (clicked, converted), weighted by slice, or by
    ``weights`` (e.g. :func:`ipw_weights`) times the slice weight. With ``clicks``, each
    example carries its leave-one-out click-count value (see the module docstring)."""
    labels = np.stack([logs.clicked, logs.converted], axis=1).astype(np.float32)
    slice_weights = np.where(logs.explored, exploration_weight, 1.0).astype(np.float32)
    if weights is not None:
        slice_weights = (slice_weights * weights).astype(np.float32)
    if clicks is None:
        return RankingExamples(logs.users, logs.items, labels, slice_weights)
    return RankingExamples(
        logs.users,
        logs.items,
        labels,
        slice_weights,
        item_column=clicks.column,
        item_values=clicks.without(logs.items, logs.clicked.astype(np.int64)),
    )


IPW_CLIP = 10.0
"""Default cap of an inverse-propensity weight, as a multiple of the mean weight."""


def ipw_weights(propensities: NDArray[np.floating], clip: float) -> F32:
    """Inverse-propensity weights towards a uniform exposure, clipped and self-normalised:
    ``w = 1 / p``, divided by its mean, capped at ``clip`` (a multiple of the mean weight),
    and divided by the mean again, so the weights average 1 (the loss keeps its scale)."""
    raw = 1.0 / np.maximum(np.asarray(propensities, dtype=np.float64), 1e-300)
    w = np.minimum(raw / raw.mean(), clip)
    return np.asarray(w / w.mean(), dtype=np.float32)


def head_losses(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row, per-head binary cross-entropy ``[B, H]`` from log probabilities ``[B, H]``."""
    log_probs = log_probs.clamp(max=-1e-7)
    log_not = torch.log(-torch.expm1(log_probs))
    return -(labels * log_probs + (1.0 - labels) * log_not)


def head_loss(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row binary cross-entropy summed over heads, from log probabilities ``[B, H]``."""
    return head_losses(log_probs, labels).sum(dim=-1)


@dataclass
class RankerTrace:
    """What :func:`train_ranker` records while it trains (for the multi-task report):
    every ``every`` steps, the cosine between the click and the conversion losses' gradients
    on the shared parameters (:func:`shared_parameters`), and the losses per head."""

    every: int = 5
    steps: list[int] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    projected: int = 0
    """PCGrad steps whose gradients conflicted (and were projected)."""
    pcgrad_steps: int = 0
    log_vars: list[float] = field(default_factory=list)
    """The learnt ``s_k`` of uncertainty weighting at the end (empty for the plain sum)."""


def shared_parameters(model: MultiTaskRanker) -> list[nn.Parameter]:
    """The parameters every task's logit reads: the MMoE experts and the interaction
    projections feeding them (the gates, towers and wide part are per task)."""
    modules: list[nn.Module] = [*model.experts, model.user_proj, model.item_proj]
    return [p for m in modules for p in m.parameters()]


def _flat(grads: tuple[torch.Tensor | None, ...], params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def train_ranker(
    user_features: NDArray[np.float32],
    item_features: NDArray[np.float32],
    examples: RankingExamples,
    config: RankerConfig,
    *,
    seed: int,
    codes: CategoryCodes | None = None,
    progress: bool = True,
    trace: RankerTrace | None = None,
) -> MultiTaskRanker:
    """Train with the weighted per-head binary cross-entropy, the heads' losses combined
    by ``config.loss_balance`` (optionally PCGrad on the shared parameters); returns the
    model in eval mode. With ``trace``, records gradient cosines and losses into it."""
    unknown = set(config.trained_heads) - set(HEADS)
    if unknown or not config.trained_heads:
        raise ValueError(f"trained_heads must be a non-empty subset of {HEADS}")
    if config.loss_balance not in LOSS_BALANCES:
        raise ValueError(f"loss_balance must be one of {LOSS_BALANCES}")
    generator = seed_torch(seed)
    model = MultiTaskRanker(user_features.shape[1], item_features.shape[1], config, codes)
    head_on = torch.tensor([h in config.trained_heads for h in HEADS], dtype=torch.float32)
    log_vars = nn.Parameter(torch.zeros(len(HEADS)))
    params = list(model.parameters())
    if config.loss_balance == "uncertainty":
        params.append(log_vars)
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    shared = shared_parameters(model)
    u_feat, i_feat = torch.from_numpy(user_features), torch.from_numpy(item_features)
    u_ids = torch.from_numpy(examples.users)
    labels, weights = torch.from_numpy(examples.labels), torch.from_numpy(examples.weights)
    n = labels.shape[0]
    batch_size = min(config.batch_size, n)
    steps = config.epochs * n_batches(n, batch_size)
    scheduler = late_decay(optimiser, steps)
    model.train()
    step = 0
    with tqdm(total=steps, desc="ranker", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            for idx in shuffled_batches(n, batch_size, generator):
                log_probs = model.log_probs(u_feat[u_ids[idx]], examples.item_rows(i_feat, idx))
                w = weights[idx]
                task = (head_losses(log_probs, labels[idx]) * w[:, None]).sum(dim=0) / w.sum()
                if config.loss_balance == "uncertainty":
                    weighted = torch.exp(-log_vars) * task
                    extra = (log_vars * head_on).sum()
                else:
                    weighted, extra = task, torch.zeros(())
                loss = (weighted * head_on).sum() + extra
                measure = trace is not None and step % trace.every == 0
                task_grads: list[torch.Tensor] = []
                if config.pcgrad or measure:
                    task_grads = [
                        _flat(
                            torch.autograd.grad(
                                weighted[k], shared, retain_graph=True, allow_unused=True
                            ),
                            shared,
                        )
                        for k in range(len(HEADS))
                    ]
                    if trace is not None and measure:
                        cos = F.cosine_similarity(task_grads[0], task_grads[1], dim=0)
                        trace.steps.append(step)
                        trace.cosines.append(float(cos))
                        trace.losses.append([float(t) for t in task.detach()])
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                if config.pcgrad and bool(head_on.all()):
                    _pcgrad(shared, task_grads, trace)
                optimiser.step()
                scheduler.step()
                step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    if trace is not None and config.loss_balance == "uncertainty":
        trace.log_vars = [float(v) for v in log_vars.detach()]
    return model.eval()


LOSS_BALANCES = ("sum", "uncertainty")


def _pcgrad(
    shared: list[nn.Parameter], task_grads: list[torch.Tensor], trace: RankerTrace | None
) -> None:
    """Replace the shared parameters' gradient (the sum of the tasks') by PCGrad's: each
    task's gradient, when it conflicts with the other's (negative dot product), projected
    onto the other's normal plane, then summed. Two tasks: the order does not matter."""
    g1, g2 = task_grads
    dot = torch.dot(g1, g2)
    if trace is not None:
        trace.pcgrad_steps += 1
    if float(dot) >= 0.0:
        return
    if trace is not None:
        trace.projected += 1
    p1 = g1 - dot / g2.pow(2).sum().clamp(min=1e-20) * g2
    p2 = g2 - dot / g1.pow(2).sum().clamp(min=1e-20) * g1
    combined = p1 + p2
    offset = 0
    for p in shared:
        size = p.numel()
        if p.grad is not None:
            p.grad.copy_(combined[offset : offset + size].view_as(p))
        offset += size
