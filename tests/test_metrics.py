"""Image and pixel metrics against sklearn and the transcribed original; the sigmoid trap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from patchcore_lightning.metrics import METRIC_NAMES, PatchCoreEvaluation, safe_binary_auroc

from . import original_oracle as oracle


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


def test_binary_auroc_sigmoid_trap_is_real_and_avoided():
    scores = torch.tensor([1000.0, 2000.0, 3000.0, 4000.0])
    labels = torch.tensor([0, 1, 0, 1])
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert float(binary_auroc(scores, labels)) == 0.5 != expected  # what raw distances would give
    with pytest.raises(ValueError, match="normalised"):
        safe_binary_auroc(scores, labels, "instance_auroc")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluation_matches_the_original_computation(seed):
    raw_scores, raw_maps, masks, labels = _category(seed)
    metric = PatchCoreEvaluation()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    for chunk in order.split(4):  # batches out of order: compute() sorts by index
        metric.update(raw_scores[chunk], raw_maps[chunk], masks[chunk], labels[chunk], chunk)
    result = metric.compute()
    members = [(raw_scores[:, m].numpy(), raw_maps[:, m].numpy()) for m in range(raw_scores.shape[1])]
    expected = oracle.evaluate(members, masks.numpy() / 255.0, labels.numpy())
    for name in METRIC_NAMES:
        assert result[name] == pytest.approx(expected[name], abs=1e-6), name
    assert torch.equal(result["indices"], torch.arange(len(labels)))


def test_undefined_metrics_are_nan_not_silent_numbers():
    raw_scores, raw_maps, masks, labels = _category(0)
    metric = PatchCoreEvaluation()
    good = slice(0, 3)
    metric.update(raw_scores[good], raw_maps[good], masks[good], labels[good], torch.arange(3))
    result = metric.compute()
    assert all(np.isnan(result[name]) for name in METRIC_NAMES)


def test_repeated_image_is_an_error():
    raw_scores, raw_maps, masks, labels = _category(0)
    metric = PatchCoreEvaluation()
    metric.update(raw_scores, raw_maps, masks, labels, torch.arange(len(labels)))
    metric.update(raw_scores[:1], raw_maps[:1], masks[:1], labels[:1], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="scored twice"):
        metric.compute()
