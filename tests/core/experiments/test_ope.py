"""Off-policy estimators on a small slate bandit whose truth is known exactly.

Contexts are drawn uniformly; the logging policy shows, with probability 1/2, a fixed
"favourite" slate of its context and otherwise a uniformly random slate, so an item's
logged propensity is ``1/2 * [in the favourite] + 1/2 * n / N``. The candidate shows a
fixed slate per context (probability 1 for its items, 0 for the rest). Clicks are drawn
with a per (context, item) probability, independent of the slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from core.experiments.ope import OffPolicyEstimate, estimate_ctr, importance_weights

CONTEXTS, ITEMS, SLATE = 6, 40, 4
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Bandit:
    click: F64
    """``[CONTEXTS, ITEMS]`` click probability."""
    favourite: I64
    """``[CONTEXTS, SLATE]``: the logging policy's fixed slate."""
    candidate: I64
    """``[CONTEXTS, SLATE]``: the candidate's slate."""

    def logged(self, context: I64, item: I64) -> F64:
        favourite = (self.favourite[context] == item[:, None]).any(axis=1)
        return np.asarray(0.5 * favourite + 0.5 * SLATE / ITEMS, dtype=np.float64)

    def target(self, context: I64, item: I64) -> F64:
        return np.asarray((self.candidate[context] == item[:, None]).any(axis=1), dtype=float)

    def value(self, slates: I64) -> float:
        """Clicks per impression of showing ``slates[c]`` to context ``c``."""
        rows = np.arange(CONTEXTS)[:, None]
        return float(self.click[rows, slates].mean())


@pytest.fixture(scope="module")
def bandit() -> Bandit:
    rng = np.random.default_rng(11)
    click = rng.beta(1.0, 6.0, size=(CONTEXTS, ITEMS))
    best = np.argsort(-click, axis=1)
    # The logger favours mediocre items; the candidate shows the best ones.
    return Bandit(click, best[:, 10 : 10 + SLATE], best[:, :SLATE])


def simulate_log(
    bandit: Bandit, answers: int, rng: np.random.Generator
) -> tuple[I64, I64, F64, I64]:
    """contexts, items, clicks and answer codes of one logged run."""
    contexts = rng.integers(0, CONTEXTS, size=answers)
    favourite = rng.random(answers) < 0.5
    random = np.argsort(rng.random((answers, ITEMS)), axis=1)[:, :SLATE]
    slates = np.where(favourite[:, None], bandit.favourite[contexts], random)
    items = slates.ravel()
    per_item = contexts.repeat(SLATE)
    clicks = (rng.random(items.size) < bandit.click[per_item, items]).astype(float)
    return per_item, items, clicks, np.arange(answers).repeat(SLATE)


def estimate(bandit: Bandit, log: tuple[I64, I64, F64, I64], **extra: float) -> OffPolicyEstimate:
    contexts, items, clicks, requests = log
    return estimate_ctr(
        clicks=clicks,
        target=bandit.target(contexts, items),
        logged=bandit.logged(contexts, items),
        requests=requests,
        slate_size=SLATE,
        **extra,
    )


def test_intervals_cover_the_candidates_true_ctr_and_the_naive_estimate_is_biased(
    bandit: Bandit,
) -> None:
    truth = bandit.value(bandit.candidate)
    logger_truth = 0.5 * bandit.value(bandit.favourite) + 0.5 * float(bandit.click.mean())
    rng = np.random.default_rng(5)
    # A deliberately rough click model, so DR's correction has work to do.
    model = np.clip(bandit.click + rng.normal(0.0, 0.05, bandit.click.shape), 0.0, 1.0)
    direct_by_context = np.array(
        [model[c, bandit.candidate[c]].sum() for c in range(CONTEXTS)], dtype=np.float64
    )
    runs = 400
    covered = {"ips": 0, "snips": 0, "dr": 0, "naive": 0}
    naive = []
    for _ in range(runs):
        log = simulate_log(bandit, 400, rng)
        contexts, items, _, requests = log
        direct = np.zeros(requests.max() + 1)
        direct[requests] = direct_by_context[contexts]
        result = estimate_ctr(
            clicks=log[2],
            target=bandit.target(contexts, items),
            logged=bandit.logged(contexts, items),
            requests=requests,
            slate_size=SLATE,
            predicted=model[contexts, items],
            direct=direct,
        )
        for name in covered:
            interval = getattr(result, name)
            covered[name] += interval.covers(truth)
        naive.append(result.naive.estimate)
    for name in ("ips", "snips", "dr"):
        assert covered[name] / runs >= 0.92, (name, covered[name] / runs)
    assert covered["naive"] / runs < 0.05
    # The naive estimate measures the logging policy, not the candidate.
    assert np.mean(naive) == pytest.approx(logger_truth, abs=0.005)
    assert truth - logger_truth > 0.1


def test_the_logging_policy_as_candidate_is_estimated_at_its_logged_ctr(bandit: Bandit) -> None:
    contexts, items, clicks, requests = simulate_log(bandit, 500, np.random.default_rng(2))
    logged = bandit.logged(contexts, items)
    result = estimate_ctr(
        clicks=clicks, target=logged, logged=logged, requests=requests, slate_size=SLATE
    )
    assert result.ips.estimate == pytest.approx(result.naive.estimate)
    assert result.snips.estimate == pytest.approx(result.naive.estimate)
    assert result.effective_sample_size == pytest.approx(result.impressions)
    assert result.dr is None
    assert result.naive.low < result.naive.estimate < result.naive.high


def test_clipping_caps_the_weights_and_counts_them(bandit: Bandit) -> None:
    log = simulate_log(bandit, 500, np.random.default_rng(3))
    free = estimate(bandit, log)
    capped = estimate(bandit, log, clip=2.0)
    # Candidate items outside the logger's favourites have weight 1 / (1/2 * n / N) = 20.
    assert free.max_weight == pytest.approx(2 * ITEMS / SLATE)
    assert free.clipped == 0
    assert capped.clipped > 0
    assert capped.ips.estimate < free.ips.estimate
    assert capped.mean_weight == pytest.approx(free.mean_weight * 2.0 / 20.0)
    weights, clipped = importance_weights([0.5, 0.2, 0.0], [0.1, 0.2, 0.3], clip=3.0)
    assert weights.tolist() == [3.0, 1.0, 0.0]
    assert clipped == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logged": [0.0, 0.5, 0.5, 0.5]}, "logged propensities"),
        ({"target": [1.5, 0.5, 0.5, 0.5]}, "target probabilities"),
        ({"requests": [0, 0, 2, 2]}, "every code"),
        ({"requests": [0, 0, 0, 0]}, "two answers"),
        ({"clicks": [2, 0, 0, 0]}, "0 or 1"),
        ({"predicted": [0.1] * 4}, "both predicted and direct"),
        ({"slate_size": 0}, "slate_size"),
    ],
)
def test_inputs_an_estimate_cannot_use_are_refused(change: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "clicks": [1, 0, 0, 1],
        "target": [0.5, 0.5, 0.5, 0.5],
        "logged": [0.5, 0.5, 0.5, 0.5],
        "requests": [0, 0, 1, 1],
        "slate_size": 2,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        estimate_ctr(**arguments)  # type: ignore[arg-type]
