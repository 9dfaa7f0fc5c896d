"""Exact rank statistics of scores against binary targets, from sorted integer keys.

Notation: n scores, P positives, Q = n - P negatives.

Every number here depends on the scores' order only. Scores are mapped to integer keys with the
same order (``order_keys``): torch sorts integers by radix sort, several times faster than a float
sort on a CPU, and no float64 copy is needed. The n keys are sorted once; each positive then
learns, by binary search, how many scores lie below it and how many tie with it. Everything else
is arithmetic on those P counts, so a pass costs one sort plus O(P log n), and the positives (the
anomalous pixels) are usually a small share of the pixels.

Memory: sorting all n keys at once costs about 24 bytes per score in torch (keys, int64 indices
and the radix sort's buffers), 180 MB for 150 maps of 224². ``count_below_runs`` sorts groups of
scores one at a time instead and adds their counts, which are additive: the working memory is
that of the largest group, at the cost of one binary search per positive and group (so groups
grow with the number of positives, ``run_length``).

AUROC is the area under the ROC curve through every distinct score (the trapezoid rule, a run of
tied scores forming one diagonal segment): sklearn's ``roc_auc_score``, torchmetrics' exact
``binary_auroc``. That area is the Mann-Whitney statistic U / (P * Q), where each
positive-negative pair counts 1 when the positive scores higher and 1/2 when they tie. 2U is an
integer: it is summed in int64 and divided once, so the result is the correctly rounded float of
the exact area.

All functions are pure tensor functions that stay on the input's device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "RankedPositives",
    "auroc_from_counts",
    "binary_auroc_exact",
    "count_below",
    "count_below_runs",
    "order_keys",
    "run_length",
    "sorted_keys",
]


# Scores per sort of ``count_below_runs`` on a CPU, at least (6 MB of sort buffers).
_RUN_ELEMENTS = 1 << 18


def run_length(device: torch.device, positives: int = 0) -> int:
    """How many scores ``count_below_runs`` should sort at a time on ``device``, for ``positives`` queries.

    On a CPU, where the sort's buffers are the process's RSS, 2**18 or twice the positives, whichever
    is more: every run costs a binary search per positive, which then stays within the sort's time.
    Elsewhere all of them (one sort is fastest).
    """
    return max(_RUN_ELEMENTS, 2 * positives) if device.type == "cpu" else 2**62


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers ordered as the scores: ``a < b`` iff ``key(a) < key(b)``, and ``a == b`` iff the keys are equal.

    (*) real → (*) int32 for float32, float16 and bfloat16 scores (float32 holds the latter two
    exactly), int64 for float64 and integer scores. A float's bits read as a signed integer are
    ordered like the float for non-negative values and in reverse for negative ones; flipping all
    bits but the sign of the negative ones fixes that. -0.0 becomes +0.0 first (they are equal).
    NaN has no place in an order: callers reject it before.
    """
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if not scores.is_floating_point():
        return scores.long()
    if scores.dtype == torch.float64:
        float_type, int_type, sign_shift = torch.float64, torch.int64, 63
    else:
        float_type, int_type, sign_shift = torch.float32, torch.int32, 31
    # a new contiguous tensor (the in-place ops below touch nothing else), -0.0 + 0.0 = +0.0
    bits = scores.to(float_type, memory_format=torch.contiguous_format, copy=True).add_(0.0).view(int_type)
    low_bits = (1 << sign_shift) - 1  # all bits but the sign
    for part in bits.view(-1).split(_RUN_ELEMENTS):  # in slices: one slice-sized temporary at a time
        part.bitwise_xor_(part.bitwise_right_shift(sign_shift).bitwise_and_(low_bits))
    return bits


def sorted_keys(scores: torch.Tensor) -> torch.Tensor:
    """``order_keys`` of all the scores (any shape), ascending. → (n,)"""
    return torch.sort(order_keys(scores.reshape(-1))).values


def count_below(sorted_keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many keys lie below each query, and how many at or below it.

    sorted_keys (n,) ascending, queries (P,) of the same dtype → ``(less, at_most)``, (P,) int64 each.
    """
    return (
        torch.searchsorted(sorted_keys, queries, right=False),
        torch.searchsorted(sorted_keys, queries, right=True),
    )


def count_below_runs(
    runs: Iterable[torch.Tensor], queries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count_below`` over the union of several groups of scores, each sorted on its own.

    runs: real score tensors (any shapes); queries (P,) ``order_keys`` of the scores' dtype →
    ``(less, at_most)``, (P,) int64 each: how many scores of all runs lie below each query, and
    at or below it. Memory is bounded by the largest run.
    """
    less = torch.zeros(queries.shape, dtype=torch.int64, device=queries.device)  # (P,)
    at_most = torch.zeros_like(less)  # (P,)
    for scores in runs:
        run_less, run_at_most = count_below(sorted_keys(scores), queries)  # (P,), (P,)
        less += run_less
        at_most += run_at_most
    return less, at_most


@dataclass(frozen=True)
class RankedPositives:
    """The positives' keys sorted, and how each ranks among the positives. All (P,).

    ``order[i]`` is the input position of ``keys[i]``; ``less[i]`` and ``at_most[i]`` count the
    positives below ``keys[i]`` and at most ``keys[i]``.
    """

    keys: torch.Tensor
    order: torch.Tensor
    less: torch.Tensor
    at_most: torch.Tensor

    @classmethod
    def of(cls, keys: torch.Tensor) -> RankedPositives:
        """From the (P,) ``order_keys`` of the positives, in any order."""
        ascending, order = torch.sort(keys)  # (P,), (P,)
        return cls(ascending, order, *count_below(ascending, ascending))

    def negatives_below(self, runs: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per positive, how many negatives lie below it and at most it: ``count_below_runs`` over
        ``runs`` of scores, which together must hold every positive, less the positives. → (P,), (P,)"""
        less, at_most = count_below_runs(runs, self.keys)
        return less - self.less, at_most - self.at_most


def auroc_from_counts(neg_less: torch.Tensor, neg_at_most: torch.Tensor, num_negatives: int) -> float:
    """Exact AUROC from, for every positive, the number of negatives scoring below it and at most it.

    neg_less, neg_at_most: (P,) int64. Returns NaN when either class is empty (the curve is
    undefined then); the caller decides whether to warn.
    """
    P, Q = neg_less.numel(), int(num_negatives)
    if P == 0 or Q == 0:
        return float("nan")
    # a positive beats the negatives below it (1 each) and ties those equal to it (1/2 each):
    # 2U = sum(2 * less + ties) = sum(less + at_most), at most 2PQ, which int64 holds for n < 2**32
    twice_u = int((neg_less + neg_at_most).sum())
    return twice_u / (2 * P * Q)  # Python ints: the exact ratio, rounded once


def binary_auroc_exact(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Exact AUROC of real scores (any shape) against binary targets of the same shape; NaN for one class."""
    scores, positive = scores.reshape(-1), targets.reshape(-1).bool()  # (n,), (n,)
    if scores.numel() >= 2**32:
        raise ValueError(f"{scores.numel()} scores are too many for an exact AUROC in int64 (at most 2**32 - 1)")
    ranked = RankedPositives.of(order_keys(scores[positive]))  # (P,)
    runs = scores.split(run_length(scores.device, ranked.keys.numel()))
    neg_less, neg_at_most = ranked.negatives_below(runs)  # (P,)
    return auroc_from_counts(neg_less, neg_at_most, scores.numel() - ranked.keys.numel())
