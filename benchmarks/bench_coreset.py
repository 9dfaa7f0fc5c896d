"""Approximate greedy coreset: ours against a plain transcription of the original's loop.

Both run in this process on the same synthetic features, each from a generator with the same
seed, so they draw the same projection and starting points. Reported: median wall time of
each (projection included), the speed ratio, the coverage radius of each selection (the
largest distance, in the original D-dimensional space, from any feature to its nearest
selected feature) and whether the two selections are identical.

    python benchmarks/bench_coreset.py                       # 47040 x 1024, 10 %, Gaussian
    python benchmarks/bench_coreset.py --data clustered --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch tensors)
import torch
import torch.nn.functional as F
from torch import Tensor

from patchcore_lightning.coreset import approx_greedy_coreset

log = logging.getLogger("bench_coreset")


def synthetic_features(n: int, d: int, kind: str, clusters: int, seed: int) -> Tensor:
    """(n, d) float32: standard Gaussian, or Gaussian blobs around ``clusters`` random centres."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, d, generator=generator)
    centres = 4 * torch.randn(clusters, d, generator=generator)  # (C, d)
    labels = torch.randint(clusters, (n,), generator=generator)  # (n,)
    scales = torch.rand(clusters, 1, generator=generator) + 0.5  # (C, 1) blobs of different widths
    return centres[labels] + scales[labels] * torch.randn(n, d, generator=generator)


def _batchwise_differences(matrix_a: Tensor, matrix_b: Tensor) -> Tensor:
    """The original's ``_compute_batchwise_differences``: (N, d), (M, d) -> (N, M)."""
    a_times_a = matrix_a.unsqueeze(1).bmm(matrix_a.unsqueeze(2)).reshape(-1, 1)
    b_times_b = matrix_b.unsqueeze(1).bmm(matrix_b.unsqueeze(2)).reshape(1, -1)
    a_times_b = matrix_a.mm(matrix_b.T)
    return (-2 * a_times_b + a_times_a + b_times_b).clamp(0, None).sqrt()


@torch.no_grad()
def plain_approx_greedy_coreset(
    features: Tensor, percentage: float, generator: torch.Generator, dimension: int = 128, starts: int = 10
) -> Tensor:
    """The original's ApproximateGreedyCoresetSampler, with the same draws as ours."""
    N, D = features.shape
    if D != dimension:
        weight = torch.empty(dimension, D)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        features = F.linear(features, weight.to(features.device))  # (N, dimension)
    start_points = torch.randperm(N, generator=generator)[: min(starts, N)]
    anchor_distances = _batchwise_differences(features, features[start_points]).mean(-1).reshape(-1, 1)  # (N, 1)
    coreset_indices = []
    for _ in range(int(N * percentage)):
        select_idx = torch.argmax(anchor_distances).item()
        coreset_indices.append(select_idx)
        select_distance = _batchwise_differences(features, features[select_idx : select_idx + 1])  # (N, 1)
        anchor_distances = torch.cat([anchor_distances, select_distance], dim=-1)  # (N, 2)
        anchor_distances = torch.min(anchor_distances, dim=1).values.reshape(-1, 1)  # (N, 1)
    return torch.tensor(coreset_indices)


def coverage_radius(features: Tensor, selected: Tensor) -> float:
    """max_i min_j |features[i] - features[selected[j]]| in the features' own space (exact)."""
    index = faiss.IndexFlatL2(features.shape[1])
    index.add(features[selected].contiguous())
    squared, _ = index.search(features.contiguous(), 1)  # (N, 1)
    return float(squared.max().clamp(min=0).sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=47040, help="number of features (default: 60 images x 28 x 28)")
    parser.add_argument("--d", type=int, default=1024, help="feature dimension")
    parser.add_argument("--percentage", type=float, default=0.1, help="fraction kept")
    parser.add_argument("--data", choices=("random", "clustered"), default="random", help="synthetic features")
    parser.add_argument("--clusters", type=int, default=200, help="blobs of --data clustered")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of both samplers")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the median time is reported")
    parser.add_argument("--skip-plain", action="store_true", help="time ours only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    features = synthetic_features(args.n, args.d, args.data, args.clusters, args.seed)
    log.info(
        "%s features %d x %d, keep %.3g (%d), %d torch threads",
        args.data, args.n, args.d, args.percentage, int(args.n * args.percentage), torch.get_num_threads(),
    )
    samplers = {"ours": approx_greedy_coreset}
    if not args.skip_plain:
        samplers = {"plain": plain_approx_greedy_coreset, **samplers}
    times: dict[str, list[float]] = {name: [] for name in samplers}
    selections: dict[str, Tensor] = {}
    for repeat in range(args.repeats):
        for name, sampler in samplers.items():  # interleaved, so load changes hit both alike
            start = time.perf_counter()
            selected = sampler(features, args.percentage, torch.Generator().manual_seed(args.seed))
            times[name].append(time.perf_counter() - start)
            if name in selections and not torch.equal(selections[name], selected):
                raise RuntimeError(f"{name} selected differently in repeat {repeat} with the same seed")
            selections[name] = selected
            log.info("  %-5s repeat %d: %.2f s", name, repeat, times[name][-1])

    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, selected in selections.items():
        log.info(
            "%-5s median %7.2f s   coverage radius %.4f   (%d unique of %d)",
            name, medians[name], coverage_radius(features, selected), len(selected.unique()), len(selected),
        )
    if "plain" in selections:
        plain, ours = selections["plain"], selections["ours"]
        same = torch.equal(plain, ours)
        overlap = len(set(plain.tolist()) & set(ours.tolist())) / len(plain)
        first_difference = "none" if same else int((plain != ours).nonzero()[0])
        log.info("speed ratio plain / ours: %.1fx", medians["plain"] / medians["ours"])
        log.info(
            "selections identical: %s (same set: %s, overlap %.1f %%, first differing step: %s)",
            same, set(plain.tolist()) == set(ours.tolist()), 100 * overlap, first_difference,
        )


if __name__ == "__main__":
    main()
