"""Rounding bounds the numeric tests hold their tolerances to, so that they hold on any CPU or GPU.

Two float32 computations of the same sums in other orders (another BLAS or convolution kernel: AVX2,
AVX-512, AMX, NEON, a GPU; another thread count) differ in their last bits. A test that compares
such results uses a bound of that rounding, computed from the data, never the difference one
machine happened to show.

u = 2^-24, float32's unit roundoff.
"""

from __future__ import annotations

import math

import numpy as np
import torch

U = 2.0**-24

# Higham & Mary (2019), "A new approach to probabilistic rounding error analysis", Thm 3.1: a sum of n
# products rounded in any order is off by at most lambda * sqrt(n) * u * sum |x_i y_i|, except with
# probability 2n exp(-lambda^2 (1-u)^2 / 2); lambda = 8 makes that below 3e-11 per sum at n = 1024.
# The deterministic bound, n * u * sum |x_i y_i| (Higham 2002, (3.5)), is sqrt(n)/8 = 4x larger at n = 1024.
LAMBDA = 8.0

# The backbone's float32 forward, as a fraction of each patch feature's norm: resnet18 through layer3
# runs 13 convolutions in sequence, each a sum of K <= 3*3*256 = 2304 products, off by at most
# lambda sqrt(K) u <= 384 u of its magnitude (above); BatchNorm, ReLU, the residual sums and the
# patch aggregation's averages add a few u each. To first order the relative errors of the layers
# add: 13 * 384 u = 4992 u < 2^13 u. An estimate, not a proof: each sum's error is relative to the
# sum of its absolute products, which cancellation can make larger than the output. So every CPU
# that runs the suite checks it against a float64 forward (test_original_fixture; measured 7 to
# 37 u), and it is used only where the other side's features cannot be measured (the original's
# stored outputs, and comparisons of batch sizes); tests/agreement.py measures both sides instead.
FEATURE_ROUNDING = 2.0**13 * U


def formula_bound(x_norm: torch.Tensor, y_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """Bound on the rounding of |x|² + |y|² - 2 x·y in float32 (faiss's IndexFlatL2, the original's
    search): |x|², |y|² and x·y are sums of ``dim`` products, each off by lambda sqrt(dim) u times
    |x|², |y|², |x||y|; three more roundings for the additions. It grows with the norms, not with
    the distance: the cancellation."""
    return (LAMBDA * math.sqrt(dim) + 3) * U * (x_norm + y_norm) ** 2


def feature_shift_bound(distance: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """How far a squared distance d = |x - y|² moves when x moves by e = FEATURE_ROUNDING |x|:
    |d(x + δ) - d(x)| <= 2 sqrt(d) |δ| + |δ|²."""
    e = FEATURE_ROUNDING * x_norm
    return 2 * distance.sqrt() * e + e * e


def auroc_shift_bound(scores: np.ndarray, labels: np.ndarray, delta: np.ndarray | float) -> float:
    """The most the AUROC of ``scores`` can change when each score moves by at most ``delta`` (scalar,
    or one per score): only the (positive, negative) pairs closer than delta_p + delta_n, whose
    intervals [s - delta, s + delta] meet, can change order, each by at most one pair in the count.
    Returns their fraction of all pairs: all pairs less those whose intervals lie apart, counted by
    sorting (any deltas, one per pixel included)."""
    scores = np.asarray(scores, dtype=np.float64)
    delta = np.broadcast_to(np.asarray(delta, dtype=np.float64), scores.shape).ravel()
    scores, labels = scores.ravel(), np.asarray(labels).ravel().astype(bool)
    lo, hi = scores - delta, scores + delta
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.0
    # pairs whose positive interval ends before the negative's begins, and the other way round
    below = int(np.searchsorted(np.sort(hi[labels]), lo[~labels], side="left").sum())
    above = int(np.searchsorted(np.sort(hi[~labels]), lo[labels], side="left").sum())
    return (n_pos * n_neg - below - above) / (n_pos * n_neg)


def _region_shares(truth: np.ndarray) -> np.ndarray:
    """Each anomalous pixel's share of the PRO, (N, H, W) float64: 1 / (its 8-connected region's size
    times the number of regions of all images), 0 on normal pixels (scipy's labelling, independent of
    the code under test)."""
    from scipy import ndimage

    shares, regions = np.zeros(truth.shape), 0
    for share, mask in zip(shares, truth):
        labels, k = ndimage.label(mask, structure=np.ones((3, 3)))
        if k:
            share[mask] = 1.0 / np.bincount(labels.ravel())[labels[mask]]
        regions += k
    return shares / max(regions, 1)


def aupro_shift_bound(maps: np.ndarray, truth: np.ndarray, delta: np.ndarray | float, fpr_limit: float = 0.3) -> float:
    """The most AUPRO (up to ``fpr_limit``, normalised by it; MVTec's) of ``maps`` (N, H, W) can change
    when each pixel moves by at most ``delta`` (scalar, or one per pixel); ``truth`` (N, H, W) the
    anomalous pixels.

    Every point of the moved curve, its straight pieces included, comes from flagging all pixels
    above some t' and a share of those at t', so it flags every pixel with lo = s - delta > t' and
    none without hi = s + delta >= t'. FPR counts only normal pixels and PRO only anomalous ones,
    so at FPR f the moved PRO lies between
        L(f) = PRO{lo > t'}   for the largest t' with #normals{hi >= t'} >= f n: the ceil(f n)-th
                              largest hi of the n normal pixels,
        U(f) = PRO{hi >= t'}  for the smallest t' with #normals{lo > t'} <= f n: the
                              (floor(f n) + 1)-th largest lo,
    both step functions of f with steps 1/n. The unmoved curve lies there too, so the two AUPROs
    are at most the area between L and U (divided by fpr_limit) apart. With delta = 0 that area is
    what exact ties of normal and anomalous scores leave open; it grows with the normal pixels
    whose intervals meet an anomalous pixel's, weighted by its region's share, not with the largest
    delta. (A common monotone rescaling of all scores, as the min-max normalisation of one member,
    changes nothing.)"""
    maps = np.asarray(maps, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    delta = np.broadcast_to(np.asarray(delta, dtype=np.float64), maps.shape)
    lo, hi = maps - delta, maps + delta
    normal_hi = -np.sort(-hi[~truth])  # (n,) descending
    normal_lo = -np.sort(-lo[~truth])  # (n,) descending
    n = len(normal_hi)
    if n == 0 or not truth.any():
        return 0.0
    share = _region_shares(truth)[truth]  # (P,)

    def pro(values: np.ndarray, thresholds: np.ndarray, strict: bool) -> np.ndarray:
        """PRO of the anomalous pixels with value > (strict) or >= each threshold."""
        order = np.argsort(values)
        above = np.concatenate([np.cumsum(share[order][::-1])[::-1], [0.0]])  # (P + 1,) share of ranks >= i
        return above[np.searchsorted(values[order], thresholds, side="right" if strict else "left")]

    # L on ((m - 1)/n, m/n], m = 1..; U on [j/n, (j + 1)/n), j = 0..; both cut at fpr_limit
    steps = np.arange(int(np.ceil(fpr_limit * n)) + 1)  # enough to cover [0, fpr_limit]
    steps = steps[steps / n < fpr_limit]
    width = np.minimum((steps + 1) / n, fpr_limit) - steps / n  # (S,) the length of each step
    lower = pro(lo[truth], normal_hi[steps], strict=True)  # m = step + 1
    upper = np.where(steps + 1 <= n, pro(hi[truth], normal_lo[np.minimum(steps, n - 1)], strict=False), 1.0)
    return float(np.sum(width * (upper - lower)) / fpr_limit)


# ---------------------------------------------------------------- bounds of the other numeric tests

F64 = 2.0**-53  # float64's unit roundoff


def chain_bound(roundings: int, magnitude, unit: float = U):
    """How far two evaluations of the same sums of products, in any order and by any kernel, can be
    apart: each is within gamma_k = k u / (1 - k u) of the exact value times the sum of the absolute
    terms (``magnitude``), k the most roundings on one path from an input to the result (Higham 2002,
    Lemma 3.1 and (3.5)); deterministic, so it holds on any CPU. Returns 2 gamma_k magnitude."""
    return 2 * roundings * unit / (1 - roundings * unit) * magnitude


def trapezoid_bound(n_points: int, unit: float = F64) -> float:
    """The rounding of an area under a curve of ``n_points`` points with coordinates in [0, 1], each a
    count divided by a total (one rounding), by the trapezoid rule in precision ``unit`` (sklearn's
    roc_auc_score in float64, torchmetrics' in float32): each Δx of two rounded coordinates is off by
    at most 2u, the y's by u, each term Δx (y0 + y1) / 2 rounds 3 times, the sum n times; all of it
    on an area <= 1: (3n + 8) u."""
    return (3 * n_points + 8) * unit


# F1 = 2 P R / (P + R) from P = TP / (TP + FP) and R = TP / (TP + FN) (sklearn's precision-recall
# curve): 5 roundings, each relative, of values <= 2; 2 TP / (2 TP + FP + FN) from integer counts is
# one correctly rounded division (ours), the same bits wherever the counts are the same.
F1_BOUND = 8 * F64


def aupro_bound(n_pixels: int, fpr_limit: float) -> float:
    """How far two float64 AUPRO computations (up to ``fpr_limit``, normalised by it) of the same
    ``n_pixels`` scores can be apart: each PRO is a sum of up to n terms, total <= 1 (off by n u),
    each FPR an integer count divided once; the trapezoids (3n + 8) u of an area <= fpr_limit; the
    interpolation at the limit a few u; divided by fpr_limit; twice, one per side."""
    return 2 * (5 * n_pixels + 20) * F64 / fpr_limit


def score_shift_bound(score, bank_norm: float, rounding: float = FEATURE_ROUNDING):
    """How far an image or patch score (a squared nearest-neighbour distance, as the original's) of
    two float32 forwards in other kernels (another batch size, thread count, process) can be apart:
    each feature is within FEATURE_ROUNDING |x| of the exact one, |x| <= |y| + sqrt(d) for its
    neighbour y (``bank_norm``: the largest bank norm), d moves by feature_shift_bound, the exact
    search rounds d once; the mean over neighbours and the max over patches move no further. Twice,
    one per side. ``rounding``: each side's relative feature error where less than FEATURE_ROUNDING
    differs (EMBED_ROUNDING: the same backbone kernels, only the patch aggregation's order differs)."""
    score = torch.as_tensor(score, dtype=torch.float64)
    e = rounding * (bank_norm + score.sqrt())
    root = score.sqrt() + e  # >= sqrt of the exact distance
    return 2 * (2 * root * e + e * e + U * score)


# The patch aggregation of non-negative (post-ReLU) layer outputs: bilinear (<= 6 roundings) and two
# adaptive poolings (windows of at most 64 values here, and a division each): no cancellation, so each
# feature element is within gamma_80 of itself, |error| <= 80 u |x| per side (Higham (3.5)).
EMBED_ROUNDING = 80 * U


def metric_shift_bounds(
    members, bank_norms, truth: np.ndarray, labels: np.ndarray, subset=None, rounding: float = FEATURE_ROUNDING
) -> dict[str, float]:
    """How far the five metrics of an ensemble can move between two float32 runs in other kernels
    (ours and the transcribed original's, which embeds one image at a time), from one run's raw
    outputs: ``members`` [(scores (N,), maps (N, H, W))], ``bank_norms`` the largest norm of each
    member's bank, ``truth`` (N, H, W) the anomalous pixels, ``labels`` (N,), ``subset`` (N,) the
    images of the anomaly-only metrics (default: those with an anomalous pixel), ``rounding`` as in
    score_shift_bound.

    Each member's scores move by score_shift_bound (its patches too: their distances are at most the
    image's), its maps as far (bilinear and blur are convex) plus both runs' blur rounding; the
    min-max normalisation turns a move of delta into at most 4 delta / (span - 2 delta); the mean
    over members moves by the mean of theirs. The metrics then move by auroc_shift_bound and
    aupro_shift_bound, plus their own float64 rounding."""
    score_shifts, map_shifts = [], []
    for (scores, maps), bank_norm in zip(members, bank_norms):
        delta = float(score_shift_bound(np.max(scores), bank_norm, rounding))
        score_shifts.append(delta)
        map_shifts.append(delta + float(chain_bound(2 * (33 + 1) + 6, np.max(maps))))
    return ensemble_metric_bounds(members, score_shifts, map_shifts, truth, labels, subset)


def normalised_shift(delta, span):
    """How far a value min-max normalised over ``span`` moves when every value moves by at most
    ``delta``: the numerator and the span each by 2 delta, of a quotient in [0, 1]: at most
    4 delta / (span - 2 delta)."""
    return 4 * delta / (span - 2 * delta)


def normalised_mean(values, shifts) -> tuple[np.ndarray, float]:
    """The mean over members of each member's min-max normalised ``values[m]`` (any shape, float64),
    and how far it moves when member m's raw values move by at most ``shifts[m]``: each member's by
    normalised_shift, the mean by the mean of theirs."""
    normalised, delta = [], 0.0
    for v, shift in zip(values, shifts):
        v = np.asarray(v, dtype=np.float64)
        span = v.max() - v.min()
        delta += normalised_shift(shift, span) / len(values)
        normalised.append((v - v.min()) / span)
    return np.mean(normalised, axis=0), delta


def ensemble_metric_bounds(members, score_shifts, map_shifts, truth, labels, subset=None) -> dict[str, float]:
    """How far the five metrics of an ensemble can move when member m's raw scores move by at most
    ``score_shifts[m]`` and its maps by ``map_shifts[m]``: ``members`` [(scores (N,), maps (N, H, W))]
    raw; the mean of the normalised members (normalised_mean), then metric_bounds."""
    scores, score_delta = normalised_mean([scores for scores, _ in members], score_shifts)
    maps, map_delta = normalised_mean([maps for _, maps in members], map_shifts)
    return metric_bounds(scores, maps, truth, labels, score_delta, map_delta, subset)


def metric_bounds(scores, maps, truth, labels, score_delta: float, map_delta: float, subset=None) -> dict[str, float]:
    """How far the five metrics of normalised ``scores`` (N,) and ``maps`` (N, H, W) can move when
    the scores move by at most ``score_delta`` and the maps by ``map_delta``: auroc_shift_bound and
    aupro_shift_bound, plus the float64 rounding of the metrics themselves (trapezoid_bound, aupro_bound).
    ``truth`` (N, H, W) the anomalous pixels, ``labels`` (N,), ``subset`` (N,) the images of the
    anomaly-only metrics (default: those with an anomalous pixel)."""
    scores, maps = np.asarray(scores, dtype=np.float64), np.asarray(maps, dtype=np.float64)
    truth, labels = np.asarray(truth, dtype=bool), np.asarray(labels).astype(bool)
    subset = truth.reshape(len(truth), -1).any(axis=1) if subset is None else np.asarray(subset, dtype=bool)
    return {
        "instance_auroc": auroc_shift_bound(scores, labels, score_delta) + trapezoid_bound(len(scores) + 1),
        "full_pixel_auroc": auroc_shift_bound(maps, truth, map_delta) + trapezoid_bound(maps.size + 1),
        "full_pro": aupro_shift_bound(maps, truth, map_delta) + aupro_bound(maps.size, 0.3),
        "anomaly_pixel_auroc": auroc_shift_bound(maps[subset], truth[subset], map_delta)
        + trapezoid_bound(maps.size + 1),
        "anomaly_pro": aupro_shift_bound(maps[subset], truth[subset], map_delta) + aupro_bound(maps.size, 0.3),
    }


def patch_score_shift(e, s, k, roundings: int):
    """How far a patch score ``s`` (the mean of its k nearest squared distances) can move when its
    feature moves by at most ``e`` (arrays alike): the distance to the r-th nearest bank row is
    1-Lipschitz in the feature, so each of the k moves by at most e and its square by e (2 r + e),
    with r <= sqrt(k s); plus ``roundings`` u of the moved score (the searches' and means' roundings)."""
    move = e * (2 * np.sqrt(k * s) + e)
    return move + roundings * U * (s + move)


def raw_metric_bounds(scores, maps, truth, labels, subset, score_shift, map_shift) -> dict[str, float]:
    """How far the five metrics of one member's raw ``scores`` (N,) and ``maps`` (N, H, W) can move
    when image i's score moves by at most ``score_shift[i]`` ((N,) or a scalar) and its pixels by
    ``map_shift`` (per pixel (N, H, W), per image (N,), or a scalar). ``truth`` (N, H, W) the
    anomalous pixels, ``labels`` (N,), ``subset`` (N,) the images of the anomaly-only metrics.

    The metrics rank the values, and the min-max normalisation is one increasing map: it changes no
    order, except where its float32 rounding (a subtraction and a division of values <= 1: 2 u on
    each side) makes or breaks a tie, so 4 u of the span widens every shift. The AUROCs move by the
    pairs closer than their two shifts (auroc_shift_bound), the AUPROs by the area between the PRO
    curves of the pixels moved down and up (aupro_shift_bound), each pixel by its own shift; plus
    their own float64 rounding."""
    scores, maps = np.asarray(scores, dtype=np.float64), np.asarray(maps, dtype=np.float64)
    truth, labels, subset = (np.asarray(a).astype(bool) for a in (truth, labels, subset))
    score_shift = np.broadcast_to(score_shift, scores.shape) + 4 * U * (scores.max() - scores.min())  # (N,)
    map_shift = np.asarray(map_shift, dtype=np.float64)
    if map_shift.ndim == 1:
        map_shift = map_shift[:, None, None]  # each image's, for each of its pixels
    pixel_shift = np.broadcast_to(map_shift, maps.shape) + 4 * U * (maps.max() - maps.min())  # (N, H, W)
    return {
        "instance_auroc": auroc_shift_bound(scores, labels, score_shift) + trapezoid_bound(len(scores) + 1),
        "full_pixel_auroc": auroc_shift_bound(maps, truth, pixel_shift) + trapezoid_bound(maps.size + 1),
        "full_pro": aupro_shift_bound(maps, truth, pixel_shift) + aupro_bound(maps.size, 0.3),
        "anomaly_pixel_auroc": auroc_shift_bound(maps[subset], truth[subset], pixel_shift[subset])
        + trapezoid_bound(maps.size + 1),
        "anomaly_pro": aupro_shift_bound(maps[subset], truth[subset], pixel_shift[subset]) + aupro_bound(maps.size, 0.3),
    }


def embed_bound(maps, patchsize: int, pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """How far two float32 evaluations of the patch features of ``maps`` [(B, C, h, w) a layer] can
    be apart, elementwise: patchify copies; the bilinear resize is 4 products of 2 weights, summed
    (<= 6 roundings); each adaptive pooling sums a window of at most ceil(n / m) + 1 values and
    divides (bounds.chain_bound). All weights are non-negative, so the sum of the absolute terms is
    the same chain on |maps|, computed here in float64 (the transcribed original's chain)."""
    from . import original_oracle as oracle

    layers = [f"l{i}" for i in range(len(maps))]
    magnitude, _ = oracle.embed(
        {name: m.abs().double() for name, m in zip(layers, maps)}, layers, patchsize, pretrain_dim, target_dim
    )
    first = max(math.ceil(m.shape[1] * patchsize**2 / pretrain_dim) for m in maps) + 1
    second = math.ceil(len(maps) * pretrain_dim / target_dim) + 1
    return chain_bound(6 + first + 1 + second + 1, magnitude)
