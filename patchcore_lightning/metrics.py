"""The five numbers of results.csv and the F1-max thresholds of thresholds.csv: pure functions, and
the torchmetrics ``Metric`` that holds one category.

The original min-max normalises every member over the whole test set (image scores over images,
maps over all pixels of all images) and averages the members (``ensemble``); only then are the
metrics computed (``normalised_metrics``). The thresholds are on the raw outputs instead (the mean
of the members' raw image scores and maps, what ``predict`` reports), so that they apply to new
images (``thresholds``). ``evaluate`` does all of it for one category's raw outputs and returns an
``Evaluation``; ``PatchCoreEvaluation``, the Metric, keeps each member's raw scores and maps until
the category ends (under DDP torchmetrics gathers them from every process) and its ``compute``
returns ``evaluate``'s result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc

from .anomaly_map import minmax_normalise, minmax_scale
from .pro import aupro_from_counts, region_weights
from .ranking import RankedPositives, auroc_from_counts, count_below_runs, order_keys, run_length

__all__ = [
    "METRIC_NAMES",
    "PRO_FPR_LIMIT",
    "THRESHOLD_NAMES",
    "Evaluation",
    "PatchCoreEvaluation",
    "curve_counts",
    "ensemble",
    "evaluate",
    "f1_max",
    "image_auroc",
    "normalised_metrics",
    "pixel_metrics",
    "thresholds",
]

log = logging.getLogger(__name__)

METRIC_NAMES = ("instance_auroc", "full_pixel_auroc", "full_pro", "anomaly_pixel_auroc", "anomaly_pro")
THRESHOLD_NAMES = ("image_threshold", "image_f1", "pixel_threshold", "pixel_f1")
PRO_FPR_LIMIT = 0.3  # the original's and MVTec AD's integration limit
_IMAGES_PER_PASS = 4  # images normalised, reordered or counted at a time


def _check_normalised(scores: torch.Tensor, what: str) -> None:
    """torchmetrics' AUROC applies a sigmoid to scores outside [0, 1] (raw PatchCore distances would
    all map to ~1 and give 0.5): the inputs here must be the normalised ones."""
    lo, hi = torch.aminmax(scores) if scores.numel() else (scores.new_zeros(()), scores.new_zeros(()))
    if not (bool(lo >= 0) and bool(hi <= 1)):  # NaN propagates into both, and fails too
        raise ValueError(f"{what}: AUROC inputs must be normalised to [0, 1]")


def _undefined(what: str, positives: int, total: int) -> float:
    log.warning("%s is undefined: the targets hold only one class (%d of %d positive)", what, positives, total)
    return math.nan


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of normalised image scores (N,) against labels (N,) (1 anomalous), by torchmetrics'
    exact ``binary_auroc``; NaN with a warning when one class is absent.

    torchmetrics computes in float32. The exact area is a multiple of 1 / (2PQ) (P anomalous, Q
    normal images; a tie counts half), so where that spacing is over twice float32's worst error of
    the N-term sum (N·2⁻²³), the nearest multiple is the exact value: 0.9775, not 0.9775000214576721.
    That holds for every MVTec AD category; beyond it the float32 value is returned.
    """
    _check_normalised(scores, "instance_auroc")
    N, P = labels.numel(), int(labels.sum())
    if P in (0, N):
        return _undefined("instance_auroc", P, N)
    auroc = float(binary_auroc(scores, labels.long(), thresholds=None))
    grid = 2 * P * (N - P)
    return round(auroc * grid) / grid if N * grid <= 2**21 else auroc


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Full and anomaly-only pixel AUROC and AUPRO of normalised maps (N, H, W) against 0..255 masks (N, H, W).

    As the original: a pixel is anomalous only where the resized mask is exactly 255 (its float mask
    1.0); "anomaly" restricts all four numbers to the images whose mask has any non-zero pixel.
    Undefined numbers are NaN, with a warning.

    Exact (every distinct score a threshold, as sklearn), from one pass of sorts (``ranking``): the
    pixels of the anomaly-only images and of the others are counted apart, so counts over either
    set, or both, come from binary searches. On a CPU the images are sorted a few at a time
    (``run_length``), so the working memory stays a few MB above the inputs.
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


def _pixel_truth(masks: torch.Tensor, labels: torch.Tensor, warn: bool = True) -> bool:
    """False when the category has anomalous images but no mask marks any of their pixels: a data
    set without pixel ground truth, whose pixel metrics are undefined."""
    anomalous = labels == 1
    if bool(anomalous.any()) and not bool(masks[anomalous].any()):
        if warn:
            log.warning("no anomalous test image has a ground-truth mask: the pixel metrics and threshold are NaN")
        return False
    return True


def normalised_metrics(
    scores: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """The five numbers of results.csv from a category's normalised outputs.

    scores (N,) and maps (N, H, W) in [0, 1] (``ensemble``), masks (N, H, W) uint8 0..255, labels (N,).
    Without pixel ground truth (no mask on any anomalous image) the pixel metrics are NaN.
    """
    pixels = pixel_metrics(maps, masks) if _pixel_truth(masks, labels) else dict.fromkeys(METRIC_NAMES[1:], math.nan)
    return {"instance_auroc": image_auroc(scores, labels), **pixels}


def f1_max(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """The threshold t that maximises the F1 score of predicting ``score >= t``, and that F1.

    scores (any shape, real), targets (the same shape, bool). Exact over every distinct score: F1
    changes only where t passes a positive's score, and is highest at one, so the positives' scores
    are the candidates, each with its counts from one sort (``ranking``). Of equal F1s, the highest
    threshold. (nan, nan) without positives.
    """
    scores, positive = scores.reshape(-1), targets.reshape(-1).bool()  # (n,), (n,)
    ranked = RankedPositives.of(order_keys(scores[positive]))  # (P,) ascending
    P, Q = ranked.keys.numel(), scores.numel() - ranked.keys.numel()
    if P == 0:
        return math.nan, math.nan
    neg_less, _ = ranked.negatives_below(scores.split(run_length(scores.device, P)))  # (P,)
    tp = (P - ranked.less).double()  # positives at or above each candidate
    fp = (Q - neg_less).double()  # negatives at or above it
    f1 = 2 * tp / (tp + fp + P)  # 2 TP / (2 TP + FP + FN)
    best = P - 1 - int(f1.flip(0).argmax())  # the last maximum: the highest threshold
    threshold = scores[positive][ranked.order[best]]
    return float(threshold), float(f1[best])


def thresholds(raw_scores: torch.Tensor, raw_maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> dict:
    """F1-max thresholds on the raw outputs: the image score (N,) and segmentation (N, H, W), each the
    mean over the members, against labels (N,) and the pixels where masks (N, H, W) are 255.

    → ``image_threshold``, ``image_f1``, ``pixel_threshold``, ``pixel_f1`` (NaN without pixel ground truth).
    """
    image_threshold, image_f1 = f1_max(raw_scores, labels == 1)
    truth = _pixel_truth(masks, labels, warn=False)  # ``normalised_metrics`` says so
    pixel_threshold, pixel_f1 = f1_max(raw_maps, masks == 255) if truth else (math.nan, math.nan)
    return {"image_threshold": image_threshold, "image_f1": image_f1,
            "pixel_threshold": pixel_threshold, "pixel_f1": pixel_f1}


def _normalised_mean(maps: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Raw maps (b, M, H, W) → members min-max normalised with their (M,) ``lo`` and ``span``, averaged. (b, H, W)

    ``minmax_normalise``'s arithmetic, image by image: the same bits as over the whole set at once.
    """
    members = maps.transpose(0, 1)  # (M, b, H, W)
    return minmax_scale(members, lo.view(-1, 1, 1, 1), span.view(-1, 1, 1, 1)).mean(dim=0)


def _reordered(
    parts: Sequence[torch.Tensor], order: torch.Tensor, fn: Callable, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``fn`` of the images of ``parts`` (concatenated along dim 0), reordered: row i of the output
    is ``fn`` of image ``order[i]``. → (N, *shape), made a few images at a time."""
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


def ensemble(
    scores: torch.Tensor, maps: torch.Tensor | Sequence[torch.Tensor], order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each member over the category, then average the members.

    scores (N, M) raw image scores; maps the raw segmentations (N, M, H, W), or a sequence of
    (b_k, M, H, W) parts that concatenate to them (the metric's state, never concatenated here);
    ``order`` (N,) reorders the outputs as ``scores[order]`` does (identity when None)
    → (N,), (N, H, W) in [0, 1].
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


def curve_counts(
    maps: torch.Tensor, targets: torch.Tensor, num_thresholds: int = 1001
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and negatives at or above each of ``num_thresholds`` evenly spaced thresholds.

    maps (N, *S) normalised scores in [0, 1], targets (N, *S) bool → ``(tp, fp)``, (T,) int64 each,
    threshold t_j = j / (T - 1): enough points to draw ROC and PR curves (TensorBoard), in constant
    memory (a few images at a time), unlike a curve through every distinct pixel score.
    """
    T = num_thresholds
    positives = torch.zeros(T, dtype=torch.int64, device=maps.device)
    negatives = torch.zeros_like(positives)
    for chunk, truth in zip(maps.split(_IMAGES_PER_PASS), targets.split(_IMAGES_PER_PASS)):
        bins = (chunk.double() * (T - 1)).floor_().clamp_(0, T - 1).long()  # score >= t_j  <=>  bin >= j
        positives += torch.bincount(bins[truth], minlength=T)
        negatives += torch.bincount(bins[~truth], minlength=T)
    return positives.flip(0).cumsum(0).flip(0), negatives.flip(0).cumsum(0).flip(0)


@dataclass
class Evaluation:
    """One category's evaluation: the five numbers of results.csv, the F1-max thresholds of
    thresholds.csv, and the outputs they were computed from, N images ordered by dataset index.

    Attributes:
        instance_auroc, full_pixel_auroc, full_pro, anomaly_pixel_auroc, anomaly_pro: the metrics
            (NaN where undefined).
        image_threshold, image_f1, pixel_threshold, pixel_f1: the F1-max thresholds on the raw
            outputs and their F1 (NaN where undefined).
        indices: (N,) int64 the images' dataset indices, ascending.
        labels: (N,) int64, 1 anomalous.
        raw_scores: (N, M) the members' raw image scores.
        scores: (N,) the normalised ensemble image scores, in [0, 1].
        maps: (N, H, W) the normalised ensemble segmentations, in [0, 1].
        masks: (N, H, W) uint8 ground truth, 255 anomalous.
    """

    instance_auroc: float
    full_pixel_auroc: float
    full_pro: float
    anomaly_pixel_auroc: float
    anomaly_pro: float
    image_threshold: float
    image_f1: float
    pixel_threshold: float
    pixel_f1: float
    indices: torch.Tensor
    labels: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    maps: torch.Tensor
    masks: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """The five numbers of results.csv, by ``METRIC_NAMES``."""
        return {name: getattr(self, name) for name in METRIC_NAMES}

    def row(self) -> dict[str, float]:
        """The five numbers and the four threshold figures, by ``METRIC_NAMES + THRESHOLD_NAMES``."""
        return {name: getattr(self, name) for name in METRIC_NAMES + THRESHOLD_NAMES}


def _parts(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def evaluate(
    raw_scores: torch.Tensor,
    raw_maps: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    masks: torch.Tensor | Sequence[torch.Tensor],
    indices: torch.Tensor | None = None,
) -> Evaluation:
    """A category's metrics and thresholds from its raw model outputs (``PatchCore.forward``'s).

    Args:
        raw_scores: (N, M) the members' raw image scores.
        raw_maps: (N, M, H, W) the members' raw segmentations, or a sequence of (b_k, M, H, W)
            parts that concatenate to them (never concatenated here: the largest input).
        labels: (N,) 1 for an anomalous image, 0 for a normal one.
        masks: (N, H, W) ground truth 0..255 (a pixel is anomalous where it is 255), or parts as ``raw_maps``.
        indices: (N,) distinct dataset indices of the images, in any order; the result is ordered
            by them (so any sharding of a data set gives the same result). Default: 0..N-1.

    Each member is min-max normalised over the category and the members averaged (``ensemble``)
    before the five numbers are computed (``normalised_metrics``); the thresholds are on the raw
    means (``thresholds``).
    """
    map_parts, mask_parts = _parts(raw_maps), _parts(masks)
    N = len(raw_scores)
    if indices is None:
        indices = torch.arange(N, device=raw_scores.device)
    if not (len(labels) == len(indices) == N == sum(len(p) for p in mask_parts)):
        raise ValueError(
            f"evaluate needs one label, mask and index per image: {N} scores, {len(labels)} labels, "
            f"{sum(len(p) for p in mask_parts)} masks, {len(indices)} indices"
        )
    order = torch.argsort(indices)
    indices = indices[order].long()
    if len(indices) > 1 and bool((indices[1:] == indices[:-1]).any()):
        raise RuntimeError("a test image was scored twice; the sampler must not repeat images")
    labels = labels[order].long()
    raw_scores_ordered = raw_scores[order]
    scores, maps = ensemble(raw_scores, map_parts, order)
    masks = _reordered(mask_parts, order, lambda chunk: chunk.to(torch.uint8), maps.shape[1:], torch.uint8)
    # the thresholds' inputs: the members' mean raw segmentation, (N, H, W)
    raw_mean_maps = _reordered(map_parts, order, lambda chunk: chunk.mean(dim=1), maps.shape[1:], maps.dtype)
    return Evaluation(
        **normalised_metrics(scores, maps, masks, labels),
        **thresholds(raw_scores_ordered.mean(dim=1), raw_mean_maps, masks, labels),
        indices=indices,
        labels=labels,
        raw_scores=raw_scores_ordered,
        scores=scores,
        maps=maps,
        masks=masks,
    )


class PatchCoreEvaluation(Metric):
    """One category's raw member outputs, kept until it ends; ``compute`` returns their ``evaluate``
    (an ``Evaluation``), with every process's outputs under DDP."""

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

    def compute(self) -> Evaluation:
        # each state is a list before a DDP gather, one tensor after it
        return evaluate(
            torch.cat(_parts(self.raw_scores)),
            _parts(self.raw_maps),
            torch.cat(_parts(self.labels)),
            _parts(self.masks),
            torch.cat(_parts(self.indices)),
        )
