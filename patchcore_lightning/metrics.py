"""The six numbers of results.csv, and the torchmetrics ``Metric`` that accumulates one category.

Each member's raw image scores and maps are kept until the category ends, because the original
min-max normalises every member over the whole test set (scores over images, maps over all pixels
of all images) before averaging the members; only then are the AUROCs and AUPROs computed.
"""

from __future__ import annotations

import logging
import math

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc

from .anomaly_map import minmax_normalise
from .pro import aupro

__all__ = ["METRIC_NAMES", "PatchCoreEvaluation", "ensemble", "pixel_auroc_and_pro", "safe_binary_auroc"]

log = logging.getLogger(__name__)

METRIC_NAMES = ("instance_auroc", "full_pixel_auroc", "full_pro", "anomaly_pixel_auroc", "anomaly_pro")


def safe_binary_auroc(scores: torch.Tensor, targets: torch.Tensor, what: str) -> float:
    """Exact AUROC of scores in [0, 1] against binary targets; NaN (with a warning) if one class is absent.

    torchmetrics applies a sigmoid to scores outside [0, 1], which would silently change the
    ranking-free normalisation of the original; the inputs here are normalised, and this is checked.
    """
    scores, targets = scores.reshape(-1), targets.reshape(-1)
    if not bool(((scores >= 0) & (scores <= 1)).all()):
        raise ValueError(f"{what}: AUROC inputs must be normalised to [0, 1]")
    positives = int(targets.sum())
    if positives == 0 or positives == targets.numel():
        log.warning("%s is undefined: the targets hold only one class (%d of %d positive)", what, positives, targets.numel())
        return math.nan
    return float(binary_auroc(scores.double(), targets.long(), thresholds=None, validate_args=False))


def _safe_aupro(maps: torch.Tensor, gt: torch.Tensor, what: str) -> float:
    if not bool(gt.any()) or bool(gt.all()):
        log.warning("%s is undefined: the ground truth holds only one class", what)
        return math.nan
    return float(aupro(maps, gt, fpr_limit=0.3))


def ensemble(scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each member over the category, then average the members.

    scores (N, M) raw image scores, maps (N, M, H, W) raw segmentations → (N,), (N, H, W) in [0, 1].
    """
    for m in range(scores.shape[1]):
        if scores[:, m].amin() == scores[:, m].amax() or maps[:, m].amin() == maps[:, m].amax():
            log.warning("ensemble member %d gives every test image the same score: it adds no ranking", m + 1)
    norm_scores = minmax_normalise(scores.T).mean(dim=0)  # (M, N) normalised over images → (N,)
    norm_maps = minmax_normalise(maps.transpose(0, 1)).mean(dim=0)  # (M, N, H, W) over all pixels → (N, H, W)
    return norm_scores, norm_maps


def pixel_auroc_and_pro(maps: torch.Tensor, masks: torch.Tensor, prefix: str) -> dict[str, float]:
    """Pixel AUROC and AUPRO of normalised maps (N, H, W) against 0..255 masks (N, H, W).

    As the original: a pixel is anomalous only where the resized mask is exactly 1.0 (255).
    """
    gt = masks == 255  # (N, H, W) bool
    return {
        f"{prefix}_pixel_auroc": safe_binary_auroc(maps, gt, f"{prefix}_pixel_auroc"),
        f"{prefix}_pro": _safe_aupro(maps, gt, f"{prefix}_pro"),
    }


class PatchCoreEvaluation(Metric):
    """Accumulates a category's raw member outputs; ``compute`` returns the metrics and the
    normalised ensemble outputs, ordered by dataset index (so any sharding gives the same result).

    ``compute()`` → dict with the five metrics (floats), and tensors ``indices`` (N,), ``labels`` (N,),
    ``raw_scores`` (N, M), ``scores`` (N,), ``maps`` (N, H, W), ``masks`` (N, H, W) uint8.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("raw_scores", default=[], dist_reduce_fx="cat")  # [(B, M)]
        self.add_state("raw_maps", default=[], dist_reduce_fx="cat")  # [(B, M, H, W)] float32
        self.add_state("masks", default=[], dist_reduce_fx="cat")  # [(B, H, W)] uint8
        self.add_state("labels", default=[], dist_reduce_fx="cat")  # [(B,)]
        self.add_state("indices", default=[], dist_reduce_fx="cat")  # [(B,)]

    def update(
        self,
        raw_scores: torch.Tensor,
        raw_maps: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
    ) -> None:
        self.raw_scores.append(raw_scores)
        self.raw_maps.append(raw_maps)
        self.masks.append(masks.to(torch.uint8))
        self.labels.append(labels.long())
        self.indices.append(indices.long())

    def compute(self) -> dict:
        def cat(state):  # a list before sync, a tensor after a DDP gather
            return torch.cat(state) if isinstance(state, list) else state

        indices = cat(self.indices)
        order = torch.argsort(indices)
        indices = indices[order]
        if len(indices) > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise RuntimeError("a test image was scored twice; the sampler must not repeat images")
        raw_scores, raw_maps = cat(self.raw_scores)[order], cat(self.raw_maps)[order]
        masks, labels = cat(self.masks)[order], cat(self.labels)[order]
        scores, maps = ensemble(raw_scores, raw_maps)
        anomalous = (masks != 0).flatten(1).any(dim=1)  # (N,) images whose mask has any non-zero pixel
        result = {"instance_auroc": safe_binary_auroc(scores, labels, "instance_auroc")}
        result.update(pixel_auroc_and_pro(maps, masks, "full"))
        if bool(anomalous.any()):
            result.update(pixel_auroc_and_pro(maps[anomalous], masks[anomalous], "anomaly"))
        else:
            log.warning("no test image has an anomalous ground-truth pixel: anomaly-only metrics are undefined")
            result.update({"anomaly_pixel_auroc": math.nan, "anomaly_pro": math.nan})
        result.update(
            indices=indices, labels=labels, raw_scores=raw_scores, scores=scores, maps=maps, masks=masks
        )
        return result
