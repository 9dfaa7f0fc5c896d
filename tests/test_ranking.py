"""Integer order keys, exact AUROC against sklearn, and the one-sort pixel metrics against
sklearn and the direct AUPRO loop of test_pro (ties, subsets, negative and special floats)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patchcore_lightning import ranking
from patchcore_lightning.metrics import METRIC_NAMES, pixel_metrics
from patchcore_lightning.ranking import binary_auroc_exact, order_keys

from .bounds import aupro_bound, trapezoid_bound
from .test_pro import _blob_masks, _oracle_aupro


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_order_keys_order_and_equality_are_the_floats(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(500, generator=g) * 10 ** torch.randint(-30, 30, (500,), generator=g).float(),
        torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, 3.0]),
    ]).to(dtype)
    keys = order_keys(x)
    assert keys.dtype == (torch.int64 if dtype == torch.float64 else torch.int32)
    a, b = x[:, None], x[None, :]
    ka, kb = keys[:, None], keys[None, :]
    assert torch.equal(ka < kb, a < b)
    assert torch.equal(ka == kb, a == b)  # -0.0 == +0.0 included


def test_order_keys_leave_the_input_alone_and_reject_non_real():
    x = torch.tensor([-0.0, -2.5, 1.5])
    before = x.clone()
    order_keys(x)
    assert torch.equal(x, before) and math.copysign(1, x[0]) == -1
    assert torch.equal(order_keys(torch.tensor([3, -7, 0])), torch.tensor([3, -7, 0]))
    for bad in (torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.complex64)):
        with pytest.raises(ValueError, match="real"):
            order_keys(bad)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_binary_auroc_exact_matches_sklearn(seed, decimals):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    targets = rng.random(n) < rng.uniform(0.05, 0.95)
    targets[0], targets[1] = True, False
    scores = rng.standard_normal(n) + 0.7 * targets
    if decimals is not None:
        scores = np.round(scores, decimals)  # ties within and across the classes
    for dtype in (np.float32, np.float64):
        got = binary_auroc_exact(torch.from_numpy(scores.astype(dtype)), torch.from_numpy(targets))
        assert got == pytest.approx(roc_auc_score(targets, scores.astype(dtype)), abs=trapezoid_bound(n + 1))  # sklearn's float64


def test_binary_auroc_exact_hand_cases():
    t = torch.tensor([0, 0, 1, 1])
    assert binary_auroc_exact(torch.tensor([0.1, 0.2, 0.3, 0.4]), t) == 1.0
    assert binary_auroc_exact(torch.tensor([0.4, 0.3, 0.2, 0.1]), t) == 0.0
    assert binary_auroc_exact(torch.full((4,), 0.5), t) == 0.5  # one tie group: the diagonal
    # positive 0.3 ties one negative and beats the other: (1 + 1/2 + 2) / 4
    assert binary_auroc_exact(torch.tensor([0.1, 0.3, 0.3, 0.4]), t) == 0.875
    assert math.isnan(binary_auroc_exact(torch.rand(5), torch.zeros(5)))
    assert math.isnan(binary_auroc_exact(torch.rand(5), torch.ones(5)))
    # exact to the last bit where a float trapezoid sum would round: 1/3 of a huge pair count
    n = 3 * 10**6
    targets = torch.arange(n) % 3 == 0
    scores = torch.where(targets, 0.5, torch.where(torch.arange(n) % 3 == 1, 0.25, 0.75))
    assert binary_auroc_exact(scores, targets) == 0.5


def _pixel_case(seed: int, decimals: int | None):
    """Normalised maps and 0/128/255 masks: good images, soft edges, ties across classes."""
    rng = np.random.default_rng(seed)
    fg = _blob_masks(rng, 6, 20, 24)
    fg[2] = False  # a second good image
    masks = np.where(fg, 255, 0).astype(np.uint8)
    masks[3, 0, :3] = 128  # a soft edge only: in the anomaly-only subset, yet normal pixels
    masks[5] = np.where(masks[5] == 255, 128, masks[5])  # an image with soft edges only
    maps = rng.random(masks.shape) + 0.5 * fg
    if decimals is not None:
        maps = np.round(maps, decimals)
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_pixel_metrics_match_sklearn_and_the_direct_aupro(seed, decimals):
    maps, masks = _pixel_case(seed, decimals)
    got = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks))
    gt = masks == 255
    subset = (masks != 0).reshape(len(masks), -1).any(axis=1)
    assert subset.sum() < len(masks) - 1  # the subset really leaves images out
    expected = {
        "full_pixel_auroc": roc_auc_score(gt.ravel(), maps.ravel()),
        "full_pro": _oracle_aupro(maps, gt, 0.3),
        "anomaly_pixel_auroc": roc_auc_score(gt[subset].ravel(), maps[subset].ravel()),
        "anomaly_pro": _oracle_aupro(maps[subset], gt[subset], 0.3),
    }
    assert list(got) == list(METRIC_NAMES[1:])
    # sklearn's float64 trapezoids, the oracle's float64 AUPRO: their rounding, not ours
    bounds = {name: trapezoid_bound(maps.size + 1) if name.endswith("auroc") else aupro_bound(maps.size, 0.3) for name in expected}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=bounds[name]), name


def test_pixel_metrics_undefined_cases_are_nan(caplog):
    maps, masks = _pixel_case(0, None)
    good = torch.from_numpy(maps[:3]), torch.zeros(3, *maps.shape[1:], dtype=torch.uint8)
    assert all(math.isnan(v) for v in pixel_metrics(*good).values())
    assert "no test image has an anomalous ground-truth pixel" in caplog.text
    soft_only = torch.from_numpy(maps[:2]), torch.full((2, *maps.shape[1:]), 128, dtype=torch.uint8)
    assert all(math.isnan(v) for v in pixel_metrics(*soft_only).values())
    with pytest.raises(ValueError, match="normalised"):
        pixel_metrics(torch.from_numpy(maps) * 2, torch.from_numpy(masks))


def test_sorting_in_runs_gives_the_one_sort_numbers_and_bounds_every_sort(monkeypatch):
    """``count_below_runs``: counts are additive over runs, so any run length gives the same metrics;
    no sort sees more than a run, whose length grows with the positives."""
    maps, masks = _pixel_case(1, 2)  # ties across runs and classes
    maps_t, masks_t = torch.from_numpy(maps), torch.from_numpy(masks)
    one_sort = pixel_metrics(maps_t, masks_t)  # 6 images of 20 x 24: one run
    sorted_sizes = []
    sorted_keys = ranking.sorted_keys

    def recording(scores):
        sorted_sizes.append(scores.numel())
        return sorted_keys(scores)

    monkeypatch.setattr(ranking, "sorted_keys", recording)
    monkeypatch.setattr(ranking, "_RUN_ELEMENTS", 2 * 20 * 24 + 5)  # two images per run
    assert ranking.run_length(torch.device("cpu")) == 2 * 20 * 24 + 5
    assert pixel_metrics(maps_t, masks_t) == one_sort
    assert max(sorted_sizes) == 2 * 20 * 24 and sum(sorted_sizes) == maps.size
    # binary AUROC in runs of 7 scores, and order keys transformed in slices of 7
    signed = torch.cat([torch.from_numpy(maps.ravel()[:500]), -torch.from_numpy(maps.ravel()[:500])])
    expected_keys = order_keys(signed)  # in one slice
    monkeypatch.setattr(ranking, "_RUN_ELEMENTS", 7)
    sorted_sizes.clear()
    scores, targets = torch.from_numpy(maps.ravel()[:500]), torch.from_numpy((masks == 255).ravel()[:500])
    scores_t = scores.view(20, 25).t()  # a non-contiguous input
    assert binary_auroc_exact(scores_t, targets.view(20, 25).t()) == roc_auc_score(targets.numpy(), scores.numpy())
    run = 2 * int(targets.sum())  # runs hold twice the positives when that is more (5 of them here)
    assert run > 7 and max(sorted_sizes) == run and sum(sorted_sizes) == 500
    keys = order_keys(signed.view(50, 20).t())  # non-contiguous, negative values in every slice
    assert torch.equal(keys, expected_keys.view(50, 20).t())
