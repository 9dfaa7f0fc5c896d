"""The six numbers of results.csv, and the torchmetrics ``Metric`` that accumulates one category.

Each member's raw image scores and maps are kept until the category ends, because the original
min-max normalises every member over the whole test set (scores over images, maps over all pixels
of all images) before averaging the members; only then are the AUROCs and AUPROs computed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from .anomaly_map import minmax_normalise
from .pro import aupro_from_counts, region_weights
from .ranking import RankedPositives, auroc_from_counts, binary_auroc_exact, count_below_runs, order_keys, run_length

__all__ = ["METRIC_NAMES", "PatchCoreEvaluation", "ensemble", "pixel_metrics", "safe_binary_auroc"]

log = logging.getLogger(__name__)

METRIC_NAMES = ("instance_auroc", "full_pixel_auroc", "full_pro", "anomaly_pixel_auroc", "anomaly_pro")
PRO_FPR_LIMIT = 0.3  # the original's and MVTec AD's integration limit
_IMAGES_PER_PASS = 16  # images normalised at a time by ``ensemble``


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


def _normalised_mean(maps: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Raw maps (b, M, H, W) → members min-max normalised with their (M,) ``lo`` and ``span``, averaged. (b, H, W)

    ``minmax_normalise``'s arithmetic, image by image: the same bits as over the whole set at once.
    """
    x = maps.transpose(0, 1)  # (M, b, H, W)
    lo, span = lo.view(-1, 1, 1, 1), span.view(-1, 1, 1, 1)
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.zeros_like(x)).mean(dim=0)


def ensemble(
    scores: torch.Tensor, maps: torch.Tensor | Sequence[torch.Tensor], order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each member over the category, then average the members.

    scores (N, M) raw image scores; maps the raw segmentations (N, M, H, W), or a sequence of
    (b_k, M, H, W) parts that concatenate to them; ``order`` (N,) reorders the outputs as
    ``scores[order]`` does (identity when None) → (N,), (N, H, W) in [0, 1].

    The maps are normalised a few images at a time into the output: no full-size temporary (the
    inputs may be a sizeable share of the process's memory).
    """
    parts = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    N, M = scores.shape
    H, W = parts[0].shape[-2:]
    lo = torch.stack([p.amin(dim=(0, 2, 3)) for p in parts if len(p)]).amin(dim=0)  # (M,) exact: a min of minima
    hi = torch.stack([p.amax(dim=(0, 2, 3)) for p in parts if len(p)]).amax(dim=0)  # (M,)
    for m in range(M):
        if scores[:, m].amin() == scores[:, m].amax() or lo[m] == hi[m]:
            log.warning("ensemble member %d gives every test image the same score: it adds no ranking", m + 1)
    if order is None:
        order = torch.arange(N, device=scores.device)
    position = torch.empty_like(order)  # (N,) where each input image goes
    position[order] = torch.arange(N, device=order.device)
    norm_scores = minmax_normalise(scores.T).mean(dim=0)[order]  # (M, N) normalised over images → (N,)
    norm_maps = parts[0].new_empty(N, H, W)
    start = 0
    for part in parts:
        for chunk in part.split(_IMAGES_PER_PASS):  # (b, M, H, W)
            stop = start + len(chunk)
            norm_maps.index_copy_(0, position[start:stop], _normalised_mean(chunk, lo, hi - lo))
            start = stop
    if start != N:
        raise ValueError(f"the maps hold {start} images, the scores {N}")
    return norm_scores, norm_maps


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Full and anomaly-only pixel AUROC and AUPRO of normalised maps (N, H, W) against 0..255 masks (N, H, W).

    As the original: a pixel is anomalous only where the resized mask is exactly 255 (its float mask
    1.0); "anomaly" restricts all four numbers to the images whose mask has any non-zero pixel.
    Undefined numbers are NaN, with a warning.

    One pass of sorts serves all four: the pixels of the anomaly-only images and those of the
    others are counted apart, so counts over either set, or over both, come from binary searches
    (``ranking``). On a CPU the images are sorted about 2**20 pixels at a time, so the working
    memory stays a few MB above the inputs whatever the number of images.
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
    images_per_run = max(1, run_length(maps.device) // max(1, gt[0].numel()))

    def runs(images: torch.Tensor):  # the maps of these images, a run's worth at a time
        return (maps.index_select(0, chunk) for chunk in images.split(images_per_run))

    # every anomalous pixel lies in the subset; the other images only add normal pixels
    sub_less, sub_at_most = ranked.negatives_below(runs(in_subset.nonzero().squeeze(1)))  # (P,)
    rest_less, rest_at_most = count_below_runs(runs((~in_subset).nonzero().squeeze(1)), ranked.keys)  # (P,)
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
        unordered_scores = cat(self.raw_scores)  # (N, M)
        raw_scores, labels, masks = unordered_scores[order], cat(self.labels)[order], cat(self.masks)[order]
        # the maps, the bulk of the state, are normalised and reordered part by part, never concatenated
        raw_maps = self.raw_maps if isinstance(self.raw_maps, list) else [self.raw_maps]
        scores, maps = ensemble(unordered_scores, raw_maps, order)
        result = {"instance_auroc": safe_binary_auroc(scores, labels, "instance_auroc")}
        result.update(pixel_metrics(maps, masks))
        result.update(
            indices=indices, labels=labels, raw_scores=raw_scores, scores=scores, maps=maps, masks=masks
        )
        return result
