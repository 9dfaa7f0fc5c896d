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
# add: 13 * 384 u = 4992 u < 2^13 u. This is what lets features computed on another CPU (the
# original's) differ from ours; the float64 forward in test_original_fixture checks it on the data.
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
    or one per score): only the (positive, negative) pairs closer than delta_p + delta_n can change
    order, each by at most one pair in the count. Returns their fraction of all pairs."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    width = float(np.max(delta)) * 2  # delta_p + delta_n <= 2 max(delta)
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if len(pos) == 0 or len(neg) == 0:
        return 0.0
    lo = np.searchsorted(neg, pos - width, side="left")
    hi = np.searchsorted(neg, pos + width, side="right")
    return float((hi - lo).sum()) / (len(pos) * len(neg))


def pro_shift_bound(scores: np.ndarray, normal: np.ndarray, delta: float, fpr_limit: float = 0.3) -> float:
    """The most AUPRO (up to ``fpr_limit``) can change when each score moves by at most ``delta``.

    At any threshold t the moved scores flag a set between {s >= t + delta} and {s >= t - delta} of
    the unmoved ones, so each point of the moved PRO curve lies on the unmoved curve at most W away
    along the FPR axis, W the largest fraction of normal pixels inside one window of width 2 delta.
    The PRO curve is below 1, so the normalised area changes by at most W / fpr_limit. (A common
    monotone rescaling of all scores, as the min-max normalisation of one member, changes nothing.)
    """
    neg = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(normal, dtype=bool)])
    if len(neg) == 0:
        return 0.0
    hi = np.searchsorted(neg, neg + 2 * float(delta), side="right")
    return float((hi - np.arange(len(neg))).max()) / len(neg) / fpr_limit
