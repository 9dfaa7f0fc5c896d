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

from .anomaly_map import minmax_normalise
from .pro import aupro_from_counts, region_weights
from .ranking import RankedPositives, auroc_from_counts, binary_auroc_exact, count_below, order_keys, sorted_keys

__all__ = ["METRIC_NAMES", "PatchCoreEvaluation", "ensemble", "pixel_metrics", "safe_binary_auroc"]

log = logging.getLogger(__name__)

METRIC_NAMES = ("instance_auroc", "full_pixel_auroc", "full_pro", "anomaly_pixel_auroc", "anomaly_pro")
PRO_FPR_LIMIT = 0.3  # the original's and MVTec AD's integration limit


def _check_normalised(scores: torch.Tensor, what: str) -> None:
    """torchmetrics' AUROC applies a sigmoid to scores outside [0, 1]; ours is rank-based, but scores
    outside [0, 1] here mean the normalisation of the original was skipped somewhere."""
    if not bool(((scores >= 0) & (scores <= 1)).all()):  # NaN fails too
        raise ValueError(f"{what}: AUROC inputs must be normalised to [0, 1]")


def _undefined(what: str, positives: int, total: int) -> float:
    log.warning("%s is undefined: the targets hold only one class (%d of %d positive)", what, positives, total)
    return math.nan


def safe_binary_auroc(scores: torch.Tensor, targets: torch.Tensor, what: str) -> float:
    """Exact AUROC of scores in [0, 1] against binary targets; NaN (with a warning) if one class is absent."""
    _check_normalised(scores, what)
    result = binary_auroc_exact(scores, targets)
    if math.isnan(result):
        return _undefined(what, int(targets.sum()), targets.numel())
    return result


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


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Full and anomaly-only pixel AUROC and AUPRO of normalised maps (N, H, W) against 0..255 masks (N, H, W).

    As the original: a pixel is anomalous only where the resized mask is exactly 255 (its float mask
    1.0); "anomaly" restricts all four numbers to the images whose mask has any non-zero pixel.
    Undefined numbers are NaN, with a warning.

    One sort serves all four: the pixels of the anomaly-only images and those of the others are
    sorted apart, so counts over either set, or over both, come from binary searches (``ranking``).
    """
    _check_normalised(maps, "pixel_auroc")
    if maps.numel() >= 2**32:  # the exact counts sum to at most numel² / 2 in int64
        raise ValueError(f"{maps.numel()} pixels are too many for exact pixel metrics (at most 2**32 - 1)")
    gt = masks == 255  # (N, H, W) anomalous pixels
    in_subset = (masks != 0).flatten(1).any(dim=1)  # (N,) the images of the anomaly-only metrics
    weights, num_regions = region_weights(gt)  # (P,) in raster order, K regions
    ranked = RankedPositives.of(order_keys(maps[gt]))  # (P,) anomalous pixels
    weights = weights[ranked.order]  # (P,) in ascending score order
    P = ranked.keys.numel()
    # every anomalous pixel lies in the subset; the other images only add normal pixels
    sub_less, sub_at_most = ranked.negatives_below(sorted_keys(maps[in_subset]))  # (P,)
    rest_less, rest_at_most = count_below(sorted_keys(maps[~in_subset]), ranked.keys)  # (P,)
    sets = {"full": (sub_less + rest_less, sub_at_most + rest_at_most, gt.numel())}
    result = {}
    if bool(in_subset.any()):
        sets["anomaly"] = (sub_less, sub_at_most, int(in_subset.sum()) * gt[0].numel())
    else:
        log.warning("no test image has an anomalous ground-truth pixel: anomaly-only metrics are undefined")
        result.update({"anomaly_pixel_auroc": math.nan, "anomaly_pro": math.nan})
    for prefix, (neg_less, neg_at_most, num_pixels) in sets.items():
        num_normal = num_pixels - P
        auroc = auroc_from_counts(neg_less, neg_at_most, num_normal)
        if math.isnan(auroc):
            result[f"{prefix}_pixel_auroc"] = _undefined(f"{prefix}_pixel_auroc", P, num_pixels)
            log.warning("%s_pro is undefined: the ground truth holds only one class", prefix)
            result[f"{prefix}_pro"] = math.nan
            continue
        result[f"{prefix}_pixel_auroc"] = auroc
        pro = aupro_from_counts(
            ranked.less, ranked.at_most, neg_less, neg_at_most, weights, num_normal, num_regions, PRO_FPR_LIMIT
        )
        result[f"{prefix}_pro"] = float(pro)
    return {name: result[name] for name in METRIC_NAMES[1:]}


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
        result = {"instance_auroc": safe_binary_auroc(scores, labels, "instance_auroc")}
        result.update(pixel_metrics(maps, masks))
        result.update(
            indices=indices, labels=labels, raw_scores=raw_scores, scores=scores, maps=maps, masks=masks
        )
        return result
