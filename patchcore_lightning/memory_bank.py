"""The memory bank: an exact L2 index with torch tensors in and out, searched by faiss or by torch.

Patch score = mean of the squared L2 distances to the k nearest bank vectors, which is what the
original's ``NearestNeighbourScorer`` computes from ``IndexFlatL2.search``.

Two exact searches:
- ``faiss``: the ``IndexFlatL2`` itself (on a GPU through a faiss GPU build). The CPU default: it
  gives the original's numbers.
- ``torch``: squared distances ``|x|² + |y|² - 2 x·y`` in float32 (faiss's BLAS formula, clamped at 0)
  by matrix products, and a running top-k, over chunks of the queries and of the bank so that the
  distance block never exceeds ``block_bytes``: memory is bounded and time linear in the bank size.
  Used on a GPU when faiss has no GPU support (the ``faiss-cpu`` wheel): the tensors never leave
  the device. Distances differ from faiss's in the last bits (another summation order).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Literal

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take and return torch tensors)
import torch

__all__ = ["KnnBackend", "MemoryBank", "gpu_faiss_available", "torch_knn"]

log = logging.getLogger(__name__)

KnnBackend = Literal["auto", "faiss", "torch"]

# Largest (queries x bank) float32 distance block of the torch search: 256 MiB.
DEFAULT_BLOCK_BYTES = 1 << 28


def gpu_faiss_available() -> bool:
    """True when both this faiss build and torch see a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def torch_knn(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    bank_sq: torch.Tensor | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """Exact squared L2 distances of each query (N, D) to its k nearest rows of ``bank`` (M, D), ascending. (N, k)

    Chunks the queries and the bank so that no distance block holds more than ``block_bytes``;
    ``bank_sq`` (M,) are the bank's squared norms, computed when not given.
    """
    N, D = queries.shape
    M = len(bank)
    if bank_sq is None:
        bank_sq = (bank * bank).sum(dim=1)  # (M,)
    elems = max(block_bytes // queries.element_size(), k)
    n_chunk = max(1, min(N, elems // min(M, elems)))  # queries per block
    m_chunk = max(k, min(M, elems // n_chunk))  # bank rows per block
    out = []
    for i in range(0, N, n_chunk):
        x = queries[i : i + n_chunk]  # (n, D)
        x_sq = (x * x).sum(dim=1, keepdim=True)  # (n, 1)
        best = None  # (n, k) the k smallest so far, ascending
        for j in range(0, M, m_chunk):
            y = bank[j : j + m_chunk]  # (m, D)
            # faiss's order, (|x|² + |y|²) - 2 x·y, clamped at 0; in place: one (n, m) block.
            d = (x_sq + bank_sq[j : j + m_chunk]).addmm_(x, y.T, alpha=-2).clamp_min_(0)  # (n, m)
            if k == 1:
                near = d.amin(dim=1, keepdim=True)  # (n, 1)
                best = near if best is None else torch.minimum(best, near)
                continue
            near = d.topk(min(k, d.shape[1]), dim=1, largest=False).values  # (n, k')
            if best is not None:
                near = torch.cat([best, near], dim=1).topk(k, dim=1, largest=False).values  # (n, k)
            best = near
        out.append(best)
    return torch.cat(out)  # (N, k)


class MemoryBank:
    """An exact L2 index over (M, D) float32 vectors.

    Args:
        index: a faiss ``IndexFlatL2`` (CPU): the bank as the original saved it.
        device: where searches run; queries are moved there, results come back on the queries' device.
        backend: ``faiss`` searches the index (moved to a CUDA ``device`` through a faiss GPU build);
            ``torch`` keeps the vectors as a tensor on ``device`` and searches by chunked matrix
            products; ``auto`` is faiss on the CPU (the original's numbers) and on a GPU when this
            faiss build has GPU support, torch on a GPU otherwise.
        block_bytes: the largest distance block of the torch search.
    """

    def __init__(
        self,
        index: faiss.Index,
        device: torch.device | str = "cpu",
        backend: KnnBackend = "auto",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_L2:
            raise TypeError(f"memory bank must be an exact L2 faiss index (IndexFlatL2), got {type(index).__name__}")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"kNN backend must be auto, faiss or torch, got {backend!r}")
        self.cpu_index = index
        self.device = torch.device(device)
        if backend == "auto":
            backend = "faiss" if self.device.type == "cpu" or gpu_faiss_available() else "torch"
        if backend == "faiss" and self.device.type == "cuda" and not gpu_faiss_available():
            raise ValueError(
                f"kNN backend faiss on {self.device} needs a faiss GPU build (faiss-gpu); use backend torch"
            )
        self.backend = backend
        self.block_bytes = block_bytes
        self._resources = None
        self.index = index
        self._vectors: torch.Tensor | None = None  # (M, D) on device, torch backend
        self._sq_norms: torch.Tensor | None = None  # (M,)
        if backend == "torch":
            self._vectors = self.vectors().to(self.device)
            self._sq_norms = (self._vectors * self._vectors).sum(dim=1)
        elif self.device.type == "cuda":
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, self.device.index or 0, index)

    @property
    def dim(self) -> int:
        return self.cpu_index.d

    def __len__(self) -> int:
        return self.cpu_index.ntotal

    @classmethod
    def from_features(
        cls, features: torch.Tensor, device: torch.device | str = "cpu", backend: KnnBackend = "auto"
    ) -> MemoryBank:
        """A bank holding the rows of ``features`` (M, D)."""
        M, D = features.shape
        index = faiss.IndexFlatL2(D)
        index.add(features.detach().to("cpu", torch.float32).contiguous())
        return cls(index, device, backend)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", backend: KnnBackend = "auto"
    ) -> MemoryBank:
        """Read a faiss index written by ``faiss.write_index`` (the original's ``.faiss`` file)."""
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot read faiss index {path}: {reason}") from None
        try:
            return cls(index, device, backend)
        except TypeError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        faiss.write_index(self.cpu_index, os.fspath(path))

    def vectors(self) -> torch.Tensor:
        """The bank as a (M, D) float32 CPU tensor."""
        return self.cpu_index.reconstruct_n(0, len(self))

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Squared L2 distances of each query (N, D) to its k nearest bank vectors, ascending. (N, k)"""
        N, D = queries.shape
        if D != self.dim:
            raise ValueError(f"queries have dimension {D}, the memory bank {self.dim}")
        if not 1 <= k <= len(self):
            raise ValueError(f"anomaly_scorer_num_nn={k} must be in [1, bank size {len(self)}]")
        target = self.device if self.device.type == "cuda" else torch.device("cpu")
        x = queries.to(target, torch.float32).contiguous()
        if self.backend == "torch":
            distances = torch_knn(x, self._vectors, k, self._sq_norms, self.block_bytes)  # (N, k)
        else:
            distances, _ = self.index.search(x, k)  # (N, k)
        return distances.to(queries.device)

    def patch_scores(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Mean squared L2 distance to the k nearest bank vectors. (N, D) → (N,)"""
        return self.search(queries, k).mean(dim=1)


def warn_gpu_unavailable() -> None:
    warnings.warn("faiss_on_gpu=true but faiss or torch sees no GPU: the memory bank stays on the CPU", stacklevel=2)
