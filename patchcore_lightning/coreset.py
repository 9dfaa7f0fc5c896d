"""Memory-bank subsamplers: approximate greedy coreset, greedy coreset, random, identity.

Pure functions ``features (N, D) -> indices (n,)``: they return *which* rows of the patch
feature bank to keep (int64, on ``features.device``, **in selection order**, never sorted),
and the caller indexes the bank with them. The algorithms are those of the original
patchcore-inspection (``patchcore/sampler.py``):

- Both coresets map the features to ``dimension_to_project_features_to`` (128) dims with a
  random linear map, ``torch.nn.Linear(D, 128, bias=False)`` with its default init (skipped
  when D already is 128), then select ``n = int(N * percentage)`` rows by greedy
  farthest-point (k-center) selection on the Euclidean distance
  ``sqrt(clamp(|a|² - 2a·b + |b|², 0))``: each step takes the point whose distance to its
  nearest selected point is largest (the first such point on ties, as ``torch.argmax``).
- ``greedy_coreset``: the original starts from the row-wise L2 norm of the full N×N distance
  matrix, so its first point is the one with the largest sum of squared distances to all
  others. As ``Σ_j |x_i - x_j|² = N |x_i - μ|² + Σ_j |x_j - μ|²``, that is the point farthest
  from the centroid μ, found here in O(N·d) instead of an N×N matrix. It draws no random
  number besides the projection.
- ``approx_greedy_coreset``: ``number_of_starting_points`` random rows; each point starts at
  the MEAN of its distances to them (the original's approximation, kept); the starting
  points are not selected themselves.

Randomness comes only from the ``generator`` argument (``None``: torch's default CPU
generator, which Lightning's ``seed_everything`` seeds). Numbers are drawn on the generator's
device and then moved to the features', so a CPU generator selects the same rows for CPU and
CUDA features. Order of consumption, so that a plain re-implementation reproduces a selection:

1. coresets: the projection weight, ``torch.nn.init.kaiming_uniform_(W, a=math.sqrt(5),
   generator=generator)`` on a float32 ``(dimension_to_project_features_to, D)`` tensor (the
   projection is ``features @ W.T``), only when ``D != dimension_to_project_features_to``;
2. ``approx_greedy_coreset``: then ``torch.randperm(N, generator=generator)[:k]``, the
   starting points, ``k = min(number_of_starting_points, N)``;
3. ``random``: ``torch.randperm(N, generator=generator)[:n]``.

``percentage == 1`` selects every row, ``torch.arange(N)``, and draws nothing (the original's
samplers reject 1 in their constructor, though their ``run`` would return every row).

How the selection is fast (same result as the step-by-step loop, up to float32 rounding on
near-ties): it never builds an N×N matrix and tracks *squared* distances (the same argmax).
The projected points are stored once as a ``(d + 2, N)`` matrix ``[x; |x|²; 1]``, so that one
product with ``[-2y, 1, |y|²]`` gives the squared distances from ``y`` to all points. On the
CPU, instead of one memory-bound matrix-vector product per step, the ``_CANDIDATES`` points
with the largest values are taken as candidates and their distances to all points computed
in one matrix product; the steps then walk through the candidates as long as the largest
candidate value exceeds every other point's value (which can only have decreased since), each
step costing one in-place O(N) minimum. On other devices every step is one matrix-vector
product, without host synchronisation.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SAMPLERS",
    "SamplerName",
    "approx_greedy_coreset",
    "greedy_coreset",
    "identity",
    "random",
    "subsample",
]

log = logging.getLogger(__name__)

SamplerName = Literal["approx_greedy_coreset", "greedy_coreset", "random", "identity"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)

# Candidates per matrix product of the CPU selection. Larger batches use the matrix product
# better but waste more rows (candidates that a closer selection pushes below the threshold);
# the (_CANDIDATES, N) float32 buffer is 1/16 of the size of N×1024 features.
_CANDIDATES = 64
# Rows per chunk when computing distances to the centroid in float64.
_CHUNK_ROWS = 65536


def identity(features: Tensor) -> Tensor:
    """Every row: ``torch.arange(N)``.

    Args:
        features: (N, D) feature bank.

    Returns:
        (N,) int64 indices on ``features.device``.
    """
    _check_features(features)
    return torch.arange(features.shape[0], device=features.device)


def random(features: Tensor, percentage: float, generator: torch.Generator | None = None) -> Tensor:
    """``int(N * percentage)`` rows drawn uniformly without replacement.

    Args:
        features: (N, D) feature bank.
        percentage: fraction of rows to keep, in (0, 1].
        generator: source of randomness (``None``: torch's default CPU generator).

    Returns:
        (n,) int64 indices on ``features.device``, in the order drawn.
    """
    num_samples = _num_samples(features, percentage)
    N = features.shape[0]
    if num_samples == N:
        return torch.arange(N, device=features.device)
    permutation = torch.randperm(N, generator=generator, device=_generator_device(generator))  # (N,)
    return permutation[:num_samples].to(features.device)


@torch.no_grad()
def greedy_coreset(
    features: Tensor,
    percentage: float,
    generator: torch.Generator | None = None,
    dimension_to_project_features_to: int = 128,
) -> Tensor:
    """Greedy k-center coreset of the original's ``GreedyCoresetSampler``.

    Starts at the point farthest from the centroid (the original's start, see the module
    docstring), then repeatedly adds the point farthest from its nearest selected point.

    Args:
        features: (N, D) feature bank, any floating dtype (computed in float32).
        percentage: fraction of rows to keep, in (0, 1].
        generator: source of the projection's randomness (``None``: torch's default CPU
            generator).
        dimension_to_project_features_to: dimension of the random projection; no projection
            when D already equals it.

    Returns:
        (n,) int64 indices, ``n = int(N * percentage)``, on ``features.device``, in
        selection order.
    """
    num_samples = _num_samples(features, percentage)
    _check_positive_int("dimension_to_project_features_to", dimension_to_project_features_to)
    N = features.shape[0]
    if num_samples == N:
        return torch.arange(N, device=features.device)

    points = _project(features, dimension_to_project_features_to, generator)  # (N, d)
    squared_norms = _squared_norms(points)  # (N,)
    first = _squared_distances_to_centroid(points).argmax().view(1)  # (1,)
    min_squared = _squared_distances(points, squared_norms, first)[:, 0]  # (N,)
    min_squared[first] = -math.inf  # selected
    rest = _farthest_first(points, squared_norms, min_squared, num_samples - 1)  # (n - 1,)
    return torch.cat([first, rest])


@torch.no_grad()
def approx_greedy_coreset(
    features: Tensor,
    percentage: float,
    generator: torch.Generator | None = None,
    dimension_to_project_features_to: int = 128,
    number_of_starting_points: int = 10,
) -> Tensor:
    """Approximate greedy coreset of the original's ``ApproximateGreedyCoresetSampler``.

    Each point starts at the mean of its distances to ``number_of_starting_points`` random
    rows (not selected themselves); each step adds the point with the largest value and
    lowers every value to the distance to the new point where that is smaller.

    Args:
        features: (N, D) feature bank, any floating dtype (computed in float32).
        percentage: fraction of rows to keep, in (0, 1].
        generator: source of randomness, for the projection and then the starting points
            (``None``: torch's default CPU generator).
        dimension_to_project_features_to: dimension of the random projection; no projection
            when D already equals it.
        number_of_starting_points: random rows whose mean distance starts the selection;
            clipped to N.

    Returns:
        (n,) int64 indices, ``n = int(N * percentage)``, on ``features.device``, in
        selection order.
    """
    num_samples = _num_samples(features, percentage)
    _check_positive_int("dimension_to_project_features_to", dimension_to_project_features_to)
    _check_positive_int("number_of_starting_points", number_of_starting_points)
    N = features.shape[0]
    if num_samples == N:
        return torch.arange(N, device=features.device)

    points = _project(features, dimension_to_project_features_to, generator)  # (N, d)
    squared_norms = _squared_norms(points)  # (N,)
    k = min(number_of_starting_points, N)
    permutation = torch.randperm(N, generator=generator, device=_generator_device(generator))  # (N,)
    starts = permutation[:k].to(points.device)  # (k,)
    mean_distance = _squared_distances(points, squared_norms, starts).sqrt_().mean(dim=1)  # (N,)
    return _farthest_first(points, squared_norms, mean_distance.square_(), num_samples)


def subsample(
    features: Tensor,
    sampler: SamplerName,
    percentage: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the rows of ``features`` that ``sampler`` keeps.

    Args:
        features: (N, D) feature bank.
        sampler: one of ``SAMPLERS``; the coresets use the original's defaults (128
            projected dims, 10 starting points).
        percentage: fraction of rows to keep, in (0, 1]; validated but unused by
            ``identity``.
        generator: source of randomness (``None``: torch's default CPU generator).

    Returns:
        (n,) int64 indices on ``features.device``, in selection order.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if sampler == "identity":
        _check_percentage(percentage)
        return identity(features)
    if sampler == "random":
        return random(features, percentage, generator)
    if sampler == "greedy_coreset":
        return greedy_coreset(features, percentage, generator)
    return approx_greedy_coreset(features, percentage, generator)


# --------------------------------------------------------------------------- validation


def _check_features(features: Tensor) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must be a non-empty (N, D) matrix, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got dtype {features.dtype}")


def _check_percentage(percentage: float) -> None:
    if isinstance(percentage, bool) or not isinstance(percentage, numbers.Real) or not 0 < percentage <= 1:
        raise ValueError(f"percentage must be a number in (0, 1], got {percentage!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _num_samples(features: Tensor, percentage: float) -> int:
    """``int(N * percentage)``, the original's count, after validating both."""
    _check_features(features)
    _check_percentage(percentage)
    N = features.shape[0]
    num_samples = int(N * percentage)
    if num_samples < 1:
        raise ValueError(f"percentage={percentage!r} of N={N} features selects no row (int(N * percentage) == 0)")
    return num_samples


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


# ----------------------------------------------------------------------------- geometry


def _project(features: Tensor, dimension: int, generator: torch.Generator | None) -> Tensor:
    """(N, D) -> (N, dimension) float32 by ``Linear(D, dimension, bias=False)``, default init."""
    N, D = features.shape
    features = features.to(torch.float32)
    if D == dimension:
        points = features
    else:
        weight = torch.empty(dimension, D, dtype=torch.float32, device=_generator_device(generator))
        # nn.Linear.reset_parameters: U(-1/sqrt(D), 1/sqrt(D)).
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        points = F.linear(features, weight.to(features.device))  # (N, dimension)
    if not bool(torch.isfinite(points).all()):
        raise ValueError("features contain NaN or infinite values")
    return points


def _squared_norms(points: Tensor) -> Tensor:
    """(N, d) -> (N,) ``|x|²`` as batched dot products, as the original (no (N, d) temporary)."""
    N, d = points.shape
    return points.view(N, 1, d).bmm(points.view(N, d, 1)).view(N)


def _squared_distances(points: Tensor, squared_norms: Tensor, others: Tensor) -> Tensor:
    """(N, d), (N,), (M,) indices -> (N, M) ``clamp(|a|² - 2a·b + |b|², 0)``, the original's formula."""
    products = points.mm(points[others].T)  # (N, M)
    return (-2 * products + squared_norms[:, None] + squared_norms[others][None, :]).clamp_(min=0)


def _squared_distances_to_centroid(points: Tensor) -> Tensor:
    """(N, d) -> (N,) ``|x - μ|²`` in float64, in chunks of rows."""
    centroid = points.mean(dim=0, dtype=torch.float64)  # (d,)
    chunks = [(chunk.double() - centroid).square_().sum(dim=1) for chunk in points.split(_CHUNK_ROWS)]
    return torch.cat(chunks)  # (N,)


def _augmented(points: Tensor, squared_norms: Tensor) -> Tensor:
    """(N, d), (N,) -> (d + 2, N) ``[x; |x|²; 1]``, contiguous by point: the layout a matrix
    product streams fastest, and one product with ``_queries`` gives squared distances."""
    N, d = points.shape
    augmented = points.new_empty(d + 2, N)
    augmented[:d] = points.T
    augmented[d] = squared_norms
    augmented[d + 1] = 1
    return augmented


def _queries(augmented: Tensor, indices: Tensor) -> Tensor:
    """(d + 2, N), (B,) -> (B, d + 2) ``[-2y, 1, |y|²]`` for the points ``y`` at ``indices``."""
    d = augmented.shape[0] - 2
    columns = augmented.index_select(1, indices).T  # (B, d + 2): [y, |y|², 1]
    queries = torch.empty_like(columns)
    queries[:, :d] = columns[:, :d] * -2
    queries[:, d] = 1
    queries[:, d + 1] = columns[:, d]
    return queries


# ------------------------------------------------------------------------ the selection


def _farthest_first(points: Tensor, squared_norms: Tensor, min_squared: Tensor, num_samples: int) -> Tensor:
    """Greedy farthest-point selection from given initial values.

    Args:
        points: (N, d) float32 projected features.
        squared_norms: (N,) ``|x|²``.
        min_squared: (N,) initial value of each point (squared distance to the nearest
            selected point, or the square of the approximate start's mean distance; ``-inf``
            for points selected already); overwritten.
        num_samples: points to select.

    Returns:
        (num_samples,) int64 indices in selection order.
    """
    if num_samples == 0:
        return torch.empty(0, dtype=torch.long, device=points.device)
    augmented = _augmented(points, squared_norms)  # (d + 2, N)
    if points.device.type == "cpu":
        return _farthest_first_batched(augmented, min_squared, num_samples)
    return _farthest_first_stepwise(augmented, min_squared, num_samples)


def _farthest_first_stepwise(augmented: Tensor, min_squared: Tensor, num_samples: int) -> Tensor:
    """One matrix-vector product per step, no host synchronisation (for accelerators).

    Args:
        augmented: (d + 2, N) from ``_augmented``.
        min_squared: (N,) initial values, overwritten.
        num_samples: points to select.

    Returns:
        (num_samples,) int64 indices in selection order.
    """
    N = augmented.shape[1]
    squared = torch.empty(1, N, dtype=augmented.dtype, device=augmented.device)  # (1, N)
    selected = torch.empty(num_samples, dtype=torch.long, device=augmented.device)
    for step in range(num_samples):
        best = min_squared.argmax().view(1)  # (1,), stays on the device
        selected[step : step + 1] = best
        torch.mm(_queries(augmented, best), augmented, out=squared).clamp_(min=0)
        torch.minimum(min_squared, squared[0], out=min_squared)
        min_squared.index_fill_(0, best, -math.inf)  # never selected twice
    return selected


def _farthest_first_batched(augmented: Tensor, min_squared: Tensor, num_samples: int) -> Tensor:
    """Steps through batches of candidates whose distances come from one matrix product (CPU).

    A batch: the ``B`` points with the largest values (sorted by index, so that ``argmax``
    keeps the first-index tie rule) and the largest value ``threshold`` of all other points.
    Other points' values only decrease, so while the largest candidate value exceeds
    ``threshold`` it is the largest of all, and that candidate is the next selection.

    Args:
        augmented: (d + 2, N) from ``_augmented``.
        min_squared: (N,) initial values, overwritten.
        num_samples: points to select.

    Returns:
        (num_samples,) int64 indices in selection order.
    """
    N = augmented.shape[1]
    B = min(_CANDIDATES, N)
    squared = augmented.new_empty(B, N)  # (B, N) squared distances from the candidates
    selected = torch.empty(num_samples, dtype=torch.long)
    step = num_batches = 0
    while step < num_samples:
        num_batches += 1
        best = int(min_squared.argmax())
        top_values, top = torch.topk(min_squared, min(B + 1, N))  # (B + 1,) descending
        threshold = float(top_values[B]) if B < N else -math.inf
        candidates = top[:B].clone()  # (B,)
        if not bool((candidates == best).any()):  # ties with the argmax beyond the top B
            candidates[-1] = best
            threshold = max(threshold, float(top_values[B - 1]))
        candidates = candidates.sort().values
        torch.mm(_queries(augmented, candidates), augmented, out=squared).clamp_(min=0)
        row = int((candidates == best).nonzero()[0])
        while True:
            point = int(candidates[row])
            selected[step] = point
            step += 1
            torch.minimum(min_squared, squared[row], out=min_squared)
            min_squared[point] = -math.inf  # never selected twice
            if step == num_samples:
                break
            candidate_values = min_squared[candidates]  # (B,)
            row = int(candidate_values.argmax())
            if not float(candidate_values[row]) > threshold:
                break
    log.debug("farthest-first: %d steps in %d candidate batches of %d", num_samples, num_batches, B)
    return selected
