"""The cost of exact distances: the bank's search (candidates by the float32 formula, then their
distances summed in float64) against the formula's distances alone, for faiss and the torch search.

    python benchmarks/bench_search.py [--bank 4704 16384] [--queries 1568] [--repeats 7]

Queries and bank are PatchCore-like: non-negative 1024-d vectors of squared norm ~400 whose nearest
bank rows lie at squared distance ~10-20. 1568 queries are one CPU batch at 224² (2 images x 28²
patches). Each timing is the median of ``--repeats`` alternated calls in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from patchcore_lightning.memory_bank import RERANK_EXTRA, MemoryBank, torch_knn


def _data(n_bank: int, n_queries: int, dim: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bank = torch.rand(n_bank, dim, generator=g) * 1.25  # |y|² ~ 1024 * 0.52 ~ 530
    near = bank[torch.randint(n_bank, (n_queries,), generator=g)]
    queries = (near + 0.1 * torch.randn(n_queries, dim, generator=g)).clamp_min(0)  # d ~ 10
    return bank, queries


def _formula_only(bank: MemoryBank, queries: torch.Tensor, k: int) -> torch.Tensor:
    """The search as it was without exact distances: the k smallest by the formula."""
    if bank.kind == "torch":
        return torch_knn(queries, bank.vectors, k, bank._cached("torch"), bank.block_bytes)[0]
    return bank._cached("faiss").search(queries.contiguous(), k)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, nargs="+", default=[4704, 16384])
    parser.add_argument("--queries", type=int, default=1568)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, queries {args.queries}, k {args.k} (+{RERANK_EXTRA} candidates)")
    print("| bank rows | search | formula only (ms) | exact distances (ms) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for n_bank in args.bank:
        vectors, queries = _data(n_bank, args.queries)
        for backend in ("faiss", "torch"):
            bank = MemoryBank(vectors, knn_backend=backend)
            calls = {"formula": lambda: _formula_only(bank, queries, args.k), "exact": lambda: bank.search(queries, args.k)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for name in calls:  # warm-up: caches, thread pools
                calls[name]()
            for _ in range(args.repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
            formula, exact = (statistics.median(times[name]) * 1e3 for name in ("formula", "exact"))
            print(f"| {n_bank} | {backend} | {formula:.1f} | {exact:.1f} | {exact / formula:.2f} |")


if __name__ == "__main__":
    main()
