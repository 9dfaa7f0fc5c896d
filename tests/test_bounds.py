"""The bounds of tests/bounds.py against brute force and against the metrics of perturbed scores."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from patchcore_lightning.pro import aupro

from .bounds import auroc_shift_bound, pro_shift_bound


def _data(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.round(rng.normal(size=n) + labels, 2)  # rounded: ties and near ties
    delta = rng.choice([0.0, 0.0043, 0.0217], size=n)  # per score, few distinct values (one per image), off the 0.01 grid
    return scores, labels, delta


def test_auroc_shift_bound_counts_the_pairs_within_their_two_shifts():
    for seed in range(5):
        scores, labels, delta = _data(seed)
        pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
        gap = np.abs(scores[pos][:, None] - scores[neg][None, :])  # (P, Q)
        within = gap <= delta[pos][:, None] + delta[neg][None, :]
        assert auroc_shift_bound(scores, labels, delta) == within.sum() / within.size
        # a scalar shift: pairs within twice it
        assert auroc_shift_bound(scores, labels, 0.0123) == (gap <= 0.0246).sum() / gap.size


def test_auroc_moves_no_further_than_the_bound():
    """The worst move (positives down, negatives up, each by its whole shift) and random moves."""
    rng = np.random.default_rng(7)
    for seed in range(5):
        scores, labels, delta = _data(seed)
        bound = auroc_shift_bound(scores, labels, delta)
        base = roc_auc_score(labels, scores)
        worst = scores - np.where(labels, delta, -delta)
        assert base - roc_auc_score(labels, worst) <= bound
        assert roc_auc_score(labels, scores + np.where(labels, delta, -delta)) - base <= bound
        for _ in range(20):
            moved = scores + delta * rng.uniform(-1, 1, size=len(scores))
            assert abs(roc_auc_score(labels, moved) - base) <= bound
        assert bound > 0 and base - roc_auc_score(labels, worst) > 0  # the data do tie within the shifts


def test_aupro_moves_no_further_than_the_bound():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 4:12, 4:12] = masks[1, 20:30, 2:9] = masks[2, 10:13, 10:30] = True
    scores = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 2)
    delta = 0.01
    bound = pro_shift_bound(scores, ~masks, delta)
    base = float(aupro(torch.from_numpy(scores), torch.from_numpy(masks)))
    for moved in (scores - np.where(masks, delta, -delta), scores + np.where(masks, delta, -delta),
                  *(scores + delta * rng.uniform(-1, 1, size=scores.shape) for _ in range(10))):
        assert abs(float(aupro(torch.from_numpy(moved), torch.from_numpy(masks))) - base) <= bound
