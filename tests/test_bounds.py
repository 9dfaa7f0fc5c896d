"""The bounds of tests/bounds.py against brute force and against the metrics of perturbed scores."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from patchcore_lightning.pro import aupro

from .bounds import aupro_bound, aupro_shift_bound, auroc_shift_bound


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


def _pro_data(seed: int, deltas):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 4:12, 4:12] = masks[1, 20:30, 2:9] = masks[2, 10:13, 10:30] = masks[2, 25:27, 3:5] = True
    scores = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 2)  # rounded: ties and near ties
    delta = rng.choice(deltas, size=masks.shape)  # (4, 32, 32): one per pixel
    return scores, masks, delta


def _aupro(scores, masks) -> float:
    return float(aupro(torch.from_numpy(scores), torch.from_numpy(masks)))


def test_aupro_moves_no_further_than_the_bound():
    """The worst moves (anomalous pixels down and normal ones up, and the other way round) and random
    moves, with per-pixel shifts that tie with the scores (0) and a scalar shift."""
    rng = np.random.default_rng(3)
    rounding = aupro_bound(4 * 32 * 32, 0.3)  # the two AUPROs' own float64 rounding
    for seed in range(4):
        scores, masks, delta = _pro_data(seed, [0.0, 0.0043, 0.0217])
        for d in (delta, 0.01):
            bound = aupro_shift_bound(scores, masks, d)
            base = _aupro(scores, masks)
            worst = [scores - np.where(masks, d, -d), scores + np.where(masks, d, -d)]
            assert base - _aupro(worst[0], masks) > 0  # the data do tie within the shifts
            for moved in (*worst, *(scores + d * rng.uniform(-1, 1, size=scores.shape) for _ in range(10))):
                assert abs(_aupro(moved, masks) - base) <= bound + rounding


def test_aupro_shift_bound_is_the_area_between_the_worst_moves():
    """Where no anomalous pixel moved down ties a normal one moved up (shifts off the scores' 0.01
    grid), the two worst moves trace the bound's lower and upper curves exactly, so the bound is the
    spread of their AUPROs (to the float64 rounding of three areas): it is attained, not loose."""
    for seed in range(4):
        scores, masks, delta = _pro_data(seed, [0.0011, 0.0043, 0.0217])
        low = _aupro(scores - np.where(masks, delta, -delta), masks)
        high = _aupro(scores + np.where(masks, delta, -delta), masks)
        bound = aupro_shift_bound(scores, masks, delta)
        assert abs(bound - (high - low)) <= 1.5 * aupro_bound(4 * 32 * 32, 0.3)
        # a scalar shift is the same bound as that shift on every pixel
        assert aupro_shift_bound(scores, masks, 0.0043) == aupro_shift_bound(scores, masks, np.full(scores.shape, 0.0043))
        # no shift: only exact ties of anomalous and normal scores leave the curve open
        exact = _aupro(scores + 1e-9 * masks, masks) - _aupro(scores - 1e-9 * masks, masks)
        assert abs(aupro_shift_bound(scores, masks, 0.0) - exact) <= 1.5 * aupro_bound(4 * 32 * 32, 0.3)
