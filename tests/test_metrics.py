"""Image and pixel metrics against sklearn, torchmetrics and the transcribed original; the sigmoid trap;
the curve counts the TensorBoard report draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from patchcore_lightning.anomaly_map import minmax_normalise
from patchcore_lightning.metrics import (
    METRIC_NAMES,
    THRESHOLD_NAMES,
    Evaluation,
    PatchCoreEvaluation,
    curve_counts,
    ensemble,
    evaluate,
    image_auroc,
    normalised_metrics,
    pixel_metrics,
    thresholds,
)

from . import original_oracle as oracle
from .bounds import U, chain_bound, metric_bounds, trapezoid_bound


def _category(seed: int, n: int = 6, members: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0] + [1] * (n - 3))
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(3, n):
        masks[i, 2 + i : 7 + i, 3:9] = 255
        masks[i, 1 + i, 3:9] = 128  # a soft edge: not anomalous, but puts the image in the subset
    raw_maps = torch.rand(n, members, size, size, generator=g) * 40 + 5 + masks[:, None].float() / 20
    raw_scores = raw_maps.flatten(2).amax(dim=2) + torch.rand(n, members, generator=g)  # far above 1
    return raw_scores, raw_maps, masks, labels


def _assert_the_originals_metrics(result, raw_scores, raw_maps, masks, labels) -> None:
    """``result``'s five numbers against the transcribed original's on the same raw outputs. Both
    normalise: M-member means of (x - lo) / span <= 1, in float32 by other kernels (the oracle in
    numpy), so the metrics may differ by what that rounding can reorder (tests/bounds.py)."""
    members = [(raw_scores[:, m].numpy(), raw_maps[:, m].numpy()) for m in range(raw_scores.shape[1])]
    expected = oracle.evaluate(members, masks.numpy() / 255.0, labels.numpy())
    scores, maps = ensemble(raw_scores, raw_maps)
    delta = float(chain_bound(raw_scores.shape[1] + 3, 1.0))
    bounds = metric_bounds(scores, maps, masks == 255, labels, delta, delta, masks.flatten(1).amax(1) > 0)
    for name in METRIC_NAMES:
        assert getattr(result, name) == pytest.approx(expected[name], abs=bounds[name]), name


def test_binary_auroc_sigmoid_trap_is_real_and_avoided():
    scores = torch.tensor([1000.0, 2000.0, 3000.0, 4000.0])
    labels = torch.tensor([0, 1, 0, 1])
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert float(binary_auroc(scores, labels)) == 0.5 != expected  # what raw distances would give
    with pytest.raises(ValueError, match="normalised"):
        image_auroc(scores, labels)
    assert image_auroc(scores / 4000, labels) == expected  # 3 of 4 pairs: exact in both


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluation_matches_the_original_computation(seed):
    raw_scores, raw_maps, masks, labels = _category(seed)
    metric = PatchCoreEvaluation()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    for chunk in order.split(4):  # batches out of order: compute() sorts by index
        metric.update(raw_scores[chunk], raw_maps[chunk], masks[chunk], labels[chunk], chunk)
    result = metric.compute()
    _assert_the_originals_metrics(result, raw_scores, raw_maps, masks, labels)
    assert torch.equal(result.indices, torch.arange(len(labels)))


def test_undefined_metrics_are_nan_not_silent_numbers():
    raw_scores, raw_maps, masks, labels = _category(0)
    metric = PatchCoreEvaluation()
    good = slice(0, 3)
    metric.update(raw_scores[good], raw_maps[good], masks[good], labels[good], torch.arange(3))
    result = metric.compute()
    assert all(np.isnan(getattr(result, name)) for name in METRIC_NAMES)


def test_repeated_image_is_an_error():
    raw_scores, raw_maps, masks, labels = _category(0)
    metric = PatchCoreEvaluation()
    metric.update(raw_scores, raw_maps, masks, labels, torch.arange(len(labels)))
    metric.update(raw_scores[:1], raw_maps[:1], masks[:1], labels[:1], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="scored twice"):
        metric.compute()


def _whole_set_ensemble(scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble over the whole set at once: every member min-max normalised, then averaged."""
    return minmax_normalise(scores.T).mean(dim=0), minmax_normalise(maps.transpose(0, 1)).mean(dim=0)


@pytest.mark.parametrize("members", [1, 3])
def test_ensemble_in_parts_is_the_whole_set_computation_bit_for_bit(members, caplog):
    g = torch.Generator().manual_seed(members)
    n = 40  # more than one pass of _IMAGES_PER_PASS images
    raw_scores = torch.rand(n, members, generator=g) * 30
    raw_maps = torch.rand(n, members, 12, 10, generator=g) * 50 + 3
    if members == 3:
        raw_maps[:, 1] = 7.0  # a constant member: zeros, and a warning
    order = torch.randperm(n, generator=g)
    expected_scores, expected_maps = _whole_set_ensemble(raw_scores[order], raw_maps[order])
    parts = list(raw_maps.split([5, 1, 20, 0, 14]))  # uneven parts, an empty one among them
    scores, maps = ensemble(raw_scores, parts, order)
    assert torch.equal(scores, expected_scores) and torch.equal(maps, expected_maps)
    assert torch.equal(ensemble(raw_scores, raw_maps, order)[1], expected_maps)  # one tensor (after a DDP gather)
    assert ("member 2 gives every test image the same score" in caplog.text) == (members == 3)
    with pytest.raises(ValueError, match="the maps hold 39 images, the scores 40"):
        ensemble(raw_scores, parts[:-1] + [parts[-1][1:]], order)


def test_evaluation_compute_keeps_no_full_size_copy_of_the_maps(monkeypatch):
    """compute reads the map state part by part: no ``torch.cat`` of the maps, no (N, M, H, W) temporary."""
    raw_scores, raw_maps, masks, labels = _category(0, n=12, members=2, size=24)
    metric = PatchCoreEvaluation()
    for chunk in torch.arange(12).split(4):
        metric.update(raw_scores[chunk], raw_maps[chunk], masks[chunk], labels[chunk], chunk)
    largest = []
    cat = torch.cat

    def recording_cat(tensors, *args, **kwargs):
        out = cat(tensors, *args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "cat", recording_cat)
    result = metric.compute()
    monkeypatch.undo()
    assert max(largest) < raw_maps.numel()  # the masks (N, H, W) are concatenated, the maps (N, M, H, W) not
    reference = PatchCoreEvaluation()
    reference.update(raw_scores, raw_maps, masks, labels, torch.arange(12))
    expected = reference.compute()
    for name in METRIC_NAMES:
        assert getattr(result, name) == getattr(expected, name), name
    assert torch.equal(result.maps, _whole_set_ensemble(raw_scores, raw_maps)[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_metrics_agree_with_torchmetrics_and_sklearn(seed):
    """The exact one-sort pixel AUROCs against torchmetrics' exact binary_auroc and sklearn's roc_auc_score."""
    g = torch.Generator().manual_seed(seed)
    n, size = 6, 24
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    masks[3:, 5:12, 4:15] = 255
    masks[3:, 4, 4:15] = 100  # soft edge: normal, but its image is in the anomaly-only subset
    maps = (torch.rand(n, size, size, generator=g) + masks.float() / 400).round(decimals=2)  # ties
    maps = minmax_normalise(maps.unsqueeze(0), dim=(1, 2, 3))[0]  # normalised over the set, as ensemble
    ours = pixel_metrics(maps, masks)
    gt = masks == 255
    subset = masks.flatten(1).amax(1) > 0
    for name, (m, t) in {"full": (maps, gt), "anomaly": (maps[subset], gt[subset])}.items():
        expected = roc_auc_score(t.flatten().numpy(), m.flatten().numpy())
        tm = float(binary_auroc(m.flatten(), t.flatten().long(), thresholds=None))
        points = len(np.unique(m.numpy())) + 1  # the curves' points: one a distinct score, and the origin
        assert ours[f"{name}_pixel_auroc"] == pytest.approx(expected, abs=trapezoid_bound(points)), name  # sklearn's float64
        assert ours[f"{name}_pixel_auroc"] == pytest.approx(tm, abs=trapezoid_bound(points, U)), name  # torchmetrics' float32


@pytest.mark.parametrize(
    "n, positives, decimals",
    [(8, 4, None), (160, 119, 2), (160, 119, None), (60, 30, 1), (150, 92, 3), (400, 200, None)],
)
def test_image_auroc_is_torchmetrics_to_the_exact_value(n, positives, decimals):
    """torchmetrics' float32 area, snapped to the multiple of 1/(2PQ) it approximates where float32's
    error is far below that spacing (MVTec AD's largest test sets: screw 160 images, 119 anomalous;
    cable 150, 92): the exact value. Beyond (400 images), torchmetrics' float32 value."""
    g = torch.Generator().manual_seed(n + positives)
    labels = (torch.arange(n) < positives).long()[torch.randperm(n, generator=g)]
    scores = torch.rand(n, generator=g) + 0.3 * labels
    scores = (scores / scores.max()).round(decimals=decimals) if decimals else scores / scores.max()  # ties too
    pos, neg = scores[labels == 1], scores[labels == 0]
    twice_u = int(2 * (pos[:, None] > neg[None]).sum() + (pos[:, None] == neg[None]).sum())  # Mann-Whitney, exact
    exact = twice_u / (2 * len(pos) * len(neg))  # the correctly rounded area
    snapped = n * 2 * positives * (n - positives) <= 2**21
    assert image_auroc(scores, labels) == (exact if snapped else float(binary_auroc(scores, labels, thresholds=None)))
    assert exact == pytest.approx(roc_auc_score(labels.numpy(), scores.double().numpy()), abs=trapezoid_bound(n + 1))
    assert abs(float(binary_auroc(scores, labels, thresholds=None)) - exact) <= trapezoid_bound(n + 1, U)  # float32 on its own


def test_evaluate_takes_the_raw_outputs_and_returns_a_typed_result():
    raw_scores, raw_maps, masks, labels = _category(3, n=9)
    result = evaluate(raw_scores, raw_maps, labels, masks)
    assert isinstance(result, Evaluation)
    _assert_the_originals_metrics(result, raw_scores, raw_maps, masks, labels)
    scores, maps = ensemble(raw_scores, raw_maps)
    assert torch.equal(result.scores, scores) and torch.equal(result.maps, maps)
    assert torch.equal(result.masks, masks) and torch.equal(result.raw_scores, raw_scores)
    assert result.metrics() == normalised_metrics(scores, maps, masks, labels)
    raw_thresholds = thresholds(raw_scores.mean(dim=1), raw_maps.mean(dim=1), masks, labels)
    assert result.row() == {**result.metrics(), **raw_thresholds}
    assert list(result.row()) == [*METRIC_NAMES, *THRESHOLD_NAMES]
    # images in any order, named by their indices: the same result, ordered by index
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    shuffled = evaluate(raw_scores[order], raw_maps[order], labels[order], masks[order], indices=order)
    assert shuffled.row() == result.row() and torch.equal(shuffled.maps, result.maps)
    assert torch.equal(shuffled.indices, torch.arange(9))
    # the Metric's compute is evaluate's result
    metric = PatchCoreEvaluation()
    for chunk in order.split(4):
        metric.update(raw_scores[chunk], raw_maps[chunk], masks[chunk], labels[chunk], chunk)
    computed = metric.compute()
    assert isinstance(computed, Evaluation) and computed.row() == result.row()
    assert torch.equal(computed.maps, result.maps)
    with pytest.raises(ValueError, match="one label, mask and index per image"):
        evaluate(raw_scores, raw_maps, labels[:-1], masks)


def test_normalised_metrics_are_the_image_auroc_and_the_pixel_metrics():
    raw_scores, raw_maps, masks, labels = _category(2)
    scores, maps = ensemble(raw_scores, raw_maps)
    result = normalised_metrics(scores, maps, masks, labels)
    assert list(result) == list(METRIC_NAMES)
    assert result["instance_auroc"] == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=trapezoid_bound(len(labels) + 1))
    assert {k: result[k] for k in METRIC_NAMES[1:]} == pixel_metrics(maps, masks)


def test_curve_counts_are_the_counts_at_or_above_each_threshold():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(9, 7, 5, generator=g)
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0
    targets = torch.rand(9, 7, 5, generator=g) < 0.3
    tp, fp = curve_counts(maps, targets, num_thresholds=11)
    for j in range(11):
        above = maps.double() >= j / 10
        assert int(tp[j]) == int((above & targets).sum()) and int(fp[j]) == int((above & ~targets).sum()), j
    assert int(tp[0]) == int(targets.sum()) and int(fp[0]) == int((~targets).sum())
