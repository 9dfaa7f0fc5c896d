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
_IMAGES_PER_PASS = 4  # images normalised (or reordered) at a time by ``ensemble`` and ``compute``


def _check_normalised(scores: torch.Tensor, what: str) -> None:
    """torchmetrics' AUROC applies a sigmoid to scores outside [0, 1]; ours is rank-based, but scores
    outside [0, 1] here mean the normalisation of the original was skipped somewhere."""
    lo, hi = torch.aminmax(scores) if scores.numel() else (scores.new_zeros(()), scores.new_zeros(()))
    if not (bool(lo >= 0) and bool(hi <= 1)):  # NaN propagates into both, and fails too
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
    if sum(len(part) for part in parts) != N:
        raise ValueError(f"the maps hold {sum(len(part) for part in parts)} images, the scores {N}")
    H, W = parts[0].shape[-2:]
    lo = torch.stack([p.amin(dim=(0, 2, 3)) for p in parts if len(p)]).amin(dim=0)  # (M,) exact: a min of minima
    hi = torch.stack([p.amax(dim=(0, 2, 3)) for p in parts if len(p)]).amax(dim=0)  # (M,)
    for m in range(M):
        if scores[:, m].amin() == scores[:, m].amax() or lo[m] == hi[m]:
            log.warning("ensemble member %d gives every test image the same score: it adds no ranking", m + 1)
    if order is None:
        order = torch.arange(N, device=scores.device)
    norm_scores = minmax_normalise(scores.T).mean(dim=0)[order]  # (M, N) normalised over images → (N,)
    norm_maps = _reordered(parts, order, lambda chunk: _normalised_mean(chunk, lo, hi - lo), (H, W), parts[0].dtype)
    return norm_scores, norm_maps


def _reordered(
    parts: Sequence[torch.Tensor], order: torch.Tensor, fn, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``fn`` of the images of ``parts`` (concatenated along dim 0), reordered: row i of the output
    is ``fn`` of image ``order[i]``. → (N, *shape)

    A few images at a time (``_IMAGES_PER_PASS``): nothing of the size of the whole is made but the output.
    """
    N = order.numel()
    if sum(len(part) for part in parts) != N:
        raise ValueError(f"the parts hold {sum(len(part) for part in parts)} images, the order {N}")
    position = torch.empty_like(order)  # (N,) the output row of every input image
    position[order] = torch.arange(N, device=order.device)
    out = torch.empty((N, *shape), dtype=dtype, device=order.device)
    start = 0
    for part in parts:
        for chunk in part.split(_IMAGES_PER_PASS):
            out.index_copy_(0, position[start : start + len(chunk)], fn(chunk))
            start += len(chunk)
    return out


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Full and anomaly-only pixel AUROC and AUPRO of normalised maps (N, H, W) against 0..255 masks (N, H, W).

    As the original: a pixel is anomalous only where the resized mask is exactly 255 (its float mask
    1.0); "anomaly" restricts all four numbers to the images whose mask has any non-zero pixel.
    Undefined numbers are NaN, with a warning.

    One pass of sorts serves all four: the pixels of the anomaly-only images and those of the
    others are counted apart, so counts over either set, or over both, come from binary searches
    (``ranking``). On a CPU the images are sorted a few at a time (``run_length``), so the
    working memory stays a few MB above the inputs whatever the number of images.
    """
    _check_normalised(maps, "pixel_auroc")
    if maps.numel() >= 2**32:  # the exact counts sum to at most numel² / 2 in int64
        raise ValueError(f"{maps.numel()} pixels are too many for exact pixel metrics (at most 2**32 - 1)")
    gt = masks == 255  # (N, H, W) anomalous pixels
    in_subset = masks.flatten(1).amax(dim=1) > 0  # (N,) the images of the anomaly-only metrics
    weights, num_regions = region_weights(gt)  # (P,) in raster order, K regions
    ranked = RankedPositives.of(order_keys(maps[gt]))  # (P,) anomalous pixels
    weights = weights[ranked.order]  # (P,) in ascending score order
    P = ranked.keys.numel()
    images_per_run = max(1, run_length(maps.device, P) // max(1, gt[0].numel()))

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
        """torchmetrics' entry point: synced under DDP by its wrapper, which then copies every output
        tensor and caches the result. ``compute_uncached`` skips both (the maps are 4 bytes a pixel)."""
        return self._evaluate()

    def compute_uncached(self) -> dict:
        """``compute``'s result, states gathered across processes as ``compute`` gathers them, without
        torchmetrics' copy of the outputs nor its cache: what the module uses at the end of a category."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=True, should_unsync=True):
            return self._evaluate()

    def _evaluate(self) -> dict:
        """The result from the states as they are (gathered or not); its tensors share no memory with them."""

        def cat(state):  # a list before sync, a tensor after a DDP gather
            return torch.cat(state) if isinstance(state, list) else state

        indices = cat(self.indices)
        order = torch.argsort(indices)
        indices = indices[order]
        if len(indices) > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise RuntimeError("a test image was scored twice; the sampler must not repeat images")
        unordered_scores = cat(self.raw_scores)  # (N, M)
        raw_scores, labels = unordered_scores[order], cat(self.labels)[order]
        # the maps and masks, the bulk of the state, are reordered part by part, never concatenated
        raw_maps = self.raw_maps if isinstance(self.raw_maps, list) else [self.raw_maps]
        mask_parts = self.masks if isinstance(self.masks, list) else [self.masks]
        scores, maps = ensemble(unordered_scores, raw_maps, order)
        masks = _reordered(mask_parts, order, lambda chunk: chunk, maps.shape[1:], torch.uint8)
        result = {"instance_auroc": safe_binary_auroc(scores, labels, "instance_auroc")}
        result.update(pixel_metrics(maps, masks))
        result.update(
            indices=indices, labels=labels, raw_scores=raw_scores, scores=scores, maps=maps, masks=masks
        )
        return result
