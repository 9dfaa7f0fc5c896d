"""The memory bank: its vectors as a module buffer (so it lives where the model runs), searched exactly.

Patch score = mean of the squared L2 distances to the k nearest bank vectors, which is what the
original's ``NearestNeighbourScorer`` computes from ``IndexFlatL2.search``.

Every search runs in two steps:
1. candidates: the ``k + RERANK_EXTRA`` bank rows nearest by ``|x|² + |y|² - 2 x·y`` in float32,
   the formula of faiss's BLAS path, by matrix products. Its rounding error grows with
   ``|x|² + |y|²``, not with the distance: with features of squared norm ~400 and nearest squared
   distances ~12 (PatchCore's), the last bits of ``x·y``, which differ between BLAS kernels
   (AVX2, AVX-512, a GPU), move a distance by up to ~1e-3 of itself.
2. distances: ``Σ (x - y)²`` of each candidate, accumulated in float64 and rounded once to float32
   (float32 where the device has no float64, Apple's MPS): no cancellation, so the result is the
   exactly rounded distance, the same bits on every CPU and GPU.
The k nearest are exact unless more than ``RERANK_EXTRA`` bank rows lie within the formula's
rounding of the k-th nearest; then the k-th distance is still within that rounding of the exact one.

Two ways to find the candidates:
- ``faiss``: an ``IndexFlatL2`` over the vectors (on a GPU through a faiss GPU build). The CPU default.
- ``torch``: the same formula by matrix products and a running top-k, over chunks of the queries
  and of the bank so that no distance block exceeds ``block_bytes``: memory is bounded and time
  linear in the bank size. It runs on any device. Its products are float32 even where TF32 is
  allowed (``--model.allow_tf32``; ``precision``).

``knn_backend`` ``auto`` picks per device: faiss on the CPU; on a GPU faiss's GPU index when the
installed faiss has GPU support, else the torch search on that GPU. ``faiss`` behind a GPU with a
CPU-only faiss searches on the CPU (``describe`` says so; the module logs it as a warning).
"""

from __future__ import annotations

import os
from typing import Literal

import faiss
import faiss.contrib.torch_utils  # lets faiss indexes take and return torch tensors
import torch
from torch import nn

from .precision import full_float32

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "RERANK_EXTRA",
    "KnnBackend",
    "MemoryBank",
    "exact_distances",
    "gpu_faiss_available",
    "search_kind",
    "torch_knn",
]

KnnBackend = Literal["auto", "faiss", "torch"]

# Largest (queries x bank) float32 distance block of the torch search: 256 MiB.
DEFAULT_BLOCK_BYTES = 1 << 28
# Candidates beyond k whose distances are computed exactly.
RERANK_EXTRA = 4


def gpu_faiss_available() -> bool:
    """True when both this faiss build and torch see a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


def search_kind(backend: KnnBackend, device: torch.device) -> Literal["faiss", "faiss-gpu", "torch"]:
    """The search a bank on ``device`` runs for ``backend``: faiss on the CPU, faiss on the GPU, or torch."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"knn_backend must be auto, faiss or torch, got {backend!r}")
    if backend == "torch":
        return "torch"
    if device.type == "cpu":
        return "faiss"
    if device.type == "cuda" and gpu_faiss_available():
        return "faiss-gpu"
    return "faiss" if backend == "faiss" else "torch"


def torch_knn(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    bank_sq: torch.Tensor | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of ``bank`` (M, D) nearest to each query (N, D) by ``|x|² + |y|² - 2 x·y`` in float32:
    (N, k) those squared distances, ascending, and (N, k) the rows' indices.

    Chunks the queries and the bank so that no distance block holds more than ``block_bytes``;
    ``bank_sq`` (M,) are the bank's squared norms, computed when not given.
    """
    with full_float32():  # TF32's products would miss the nearest rows (precision)
        return _torch_knn(queries, bank, k, bank_sq, block_bytes)


def _torch_knn(
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_sq: torch.Tensor | None, block_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = queries.shape
    M = len(bank)
    if bank_sq is None:
        bank_sq = (bank * bank).sum(dim=1)  # (M,)
    elems = max(block_bytes // queries.element_size(), k)
    n_chunk = max(1, min(N, elems // min(M, elems)))  # queries per block
    m_chunk = max(k, min(M, elems // n_chunk))  # bank rows per block
    values, indices = [], []
    for i in range(0, N, n_chunk):
        x = queries[i : i + n_chunk]  # (n, D)
        x_sq = (x * x).sum(dim=1, keepdim=True)  # (n, 1)
        best, best_idx = None, None  # (n, k) the k smallest so far, ascending, and their rows
        for j in range(0, M, m_chunk):
            y = bank[j : j + m_chunk]  # (m, D)
            # faiss's order, (|x|² + |y|²) - 2 x·y, clamped at 0; in place: one (n, m) block.
            d = (x_sq + bank_sq[j : j + m_chunk]).addmm_(x, y.T, alpha=-2).clamp_min_(0)  # (n, m)
            near, near_idx = d.topk(min(k, d.shape[1]), dim=1, largest=False)  # (n, k')
            near_idx += j
            if best is not None:
                near, pick = torch.cat([best, near], dim=1).topk(k, dim=1, largest=False)  # (n, k)
                near_idx = torch.cat([best_idx, near_idx], dim=1).gather(1, pick)  # (n, k)
            best, best_idx = near, near_idx
        values.append(best)
        indices.append(best_idx)
    return torch.cat(values), torch.cat(indices)  # (N, k), (N, k)


def exact_distances(
    queries: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, block_bytes: int | None = None
) -> torch.Tensor:
    """``Σ (x - y)²`` of each query (N, D) to the bank rows ``rows`` (N, c) names, accumulated in float64
    and rounded once to float32 (in float32 on a device without float64). (N, c)

    Without the cancellation of ``|x|² + |y|² - 2 x·y``: the exactly rounded distances, whatever kernel
    or device runs it. Works through the queries in blocks of at most ``block_bytes`` per float64
    buffer (default 4 MiB on a CPU, where the buffers stay in cache; 64 MiB on a GPU, fewer kernel
    launches), reused for every block and candidate: nothing is allocated per step.
    """
    N, D = queries.shape
    if block_bytes is None:
        block_bytes = 1 << 22 if queries.device.type == "cpu" else 1 << 26
    c = rows.shape[1]
    wide = torch.float32 if queries.device.type == "mps" else torch.float64
    n_chunk = max(1, min(N, block_bytes // (D * 8)))
    out = torch.empty(N, c, dtype=torch.float32, device=queries.device)
    x = torch.empty(n_chunk, D, dtype=wide, device=queries.device)  # the queries, widened
    y = torch.empty(n_chunk, D, dtype=bank.dtype, device=queries.device)  # a candidate per query
    diff = torch.empty(n_chunk, D, dtype=wide, device=queries.device)  # then its squares
    total = torch.empty(n_chunk, dtype=wide, device=queries.device)
    for i in range(0, N, n_chunk):
        n = min(n_chunk, N - i)
        x[:n].copy_(queries[i : i + n])
        for j in range(c):
            torch.index_select(bank, 0, rows[i : i + n, j], out=y[:n])  # (n, D)
            torch.sub(x[:n], y[:n], out=diff[:n]).square_()  # (n, D)
            torch.sum(diff[:n], dim=1, out=total[:n])  # (n,)
            out[i : i + n, j] = total[:n]
    return out


class MemoryBank(nn.Module):
    """An exact L2 index over (M, D) float32 vectors, held as the buffer ``vectors``.

    Args:
        vectors: (M, D) the bank.
        knn_backend: ``auto``, ``faiss`` or ``torch`` (see the module docstring); the search is
            picked for the device the buffer is on when ``search`` runs.
        block_bytes: the largest distance block of the torch search.
    """

    def __init__(
        self, vectors: torch.Tensor, knn_backend: KnnBackend = "auto", block_bytes: int = DEFAULT_BLOCK_BYTES
    ) -> None:
        super().__init__()
        if vectors.ndim != 2:
            raise ValueError(f"memory bank vectors must be (M, D), got shape {tuple(vectors.shape)}")
        search_kind(knn_backend, vectors.device)  # validates the name
        self.register_buffer("vectors", vectors.detach().to(torch.float32).contiguous(), persistent=False)
        self.knn_backend = knn_backend
        self.block_bytes = block_bytes
        self._cache: tuple[tuple, object] | None = None  # (what it was made for, faiss index or squared norms)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def kind(self) -> str:
        """The search that runs for the bank where it is now: faiss, faiss-gpu or torch."""
        return search_kind(self.knn_backend, self.vectors.device)

    def describe(self) -> str:
        """Which search runs where, for the log."""
        kind, device = self.kind, self.vectors.device
        if kind == "faiss":
            where = "the CPU" + (f", behind {device} (a CPU-only faiss build)" if device.type != "cpu" else "")
            return f"faiss IndexFlatL2 on {where}"
        return f"faiss GPU index on {device}" if kind == "faiss-gpu" else f"exact torch search on {device}"

    @classmethod
    def from_index(cls, index: faiss.Index, knn_backend: KnnBackend = "auto") -> MemoryBank:
        """A bank holding the vectors of a faiss ``IndexFlatL2`` (which then serves CPU searches)."""
        if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_L2:
            raise TypeError(f"memory bank must be an exact L2 faiss index (IndexFlatL2), got {type(index).__name__}")
        bank = cls(index.reconstruct_n(0, index.ntotal).view(index.ntotal, index.d), knn_backend)
        bank._cache = (bank._cache_key("faiss"), index)
        return bank

    @classmethod
    def load(cls, path: str | os.PathLike, knn_backend: KnnBackend = "auto") -> MemoryBank:
        """Read a faiss index written by ``faiss.write_index`` (the original's ``.faiss`` file)."""
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot read faiss index {path}: {reason}") from None
        try:
            return cls.from_index(index, knn_backend)
        except TypeError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank as the original does: a faiss ``IndexFlatL2`` (``faiss.write_index``)."""
        index = faiss.IndexFlatL2(self.dim)
        index.add(self.vectors.detach().cpu())
        faiss.write_index(index, os.fspath(path))

    def _cache_key(self, kind: str) -> tuple:
        return kind, self.vectors.device, self.vectors.data_ptr()

    def _cached(self, kind: str):
        """The faiss index (``faiss``, ``faiss-gpu``) or the squared norms (``torch``) of the vectors as they are now."""
        key = self._cache_key(kind)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None  # release the old one first
        vectors = self.vectors.detach()
        if kind == "torch":
            value = (vectors * vectors).sum(dim=1)  # (M,)
        else:
            index = faiss.IndexFlatL2(self.dim)
            index.add(vectors.cpu())
            if kind == "faiss-gpu":
                resources = faiss.StandardGpuResources()
                index = (resources, faiss.index_cpu_to_gpu(resources, vectors.device.index or 0, index))
            value = index
        self._cache = (key, value)
        return value

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Squared L2 distances of each query (N, D) to its k nearest bank vectors, ascending. (N, k)

        The result is on the queries' device.
        """
        N, D = queries.shape
        if D != self.dim:
            raise ValueError(f"queries have dimension {D}, the memory bank {self.dim}")
        if not 1 <= k <= len(self):
            raise ValueError(f"anomaly_scorer_num_nn={k} must be in [1, bank size {len(self)}]")
        kind = self.kind
        c = min(k + RERANK_EXTRA, len(self))  # candidates
        if kind == "torch":
            x = queries.to(self.vectors.device, torch.float32)
            _, rows = torch_knn(x, self.vectors, c, self._cached("torch"), self.block_bytes)
        elif kind == "faiss-gpu":
            x = queries.to(self.vectors.device, torch.float32).contiguous()
            _, rows = self._cached(kind)[1].search(x, c)
        else:  # the CPU index, also behind another device when asked for (``describe`` says so)
            x = queries.to("cpu", torch.float32).contiguous()
            _, rows = self._cached(kind).search(x, c)
        # the candidates' exact distances, where the vectors are
        vectors = self.vectors.detach().to(torch.float32)
        x, rows = x.to(vectors.device), rows.to(vectors.device)
        distances = exact_distances(x, vectors, rows)  # (N, c)
        distances = distances.topk(k, dim=1, largest=False).values  # (N, k) ascending
        return distances.to(queries.device)

    def patch_scores(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Mean squared L2 distance to the k nearest bank vectors. (N, D) → (N,)"""
        return self.search(queries, k).mean(dim=1)

