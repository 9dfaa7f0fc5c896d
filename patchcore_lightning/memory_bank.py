"""The memory bank: an exact L2 faiss index (CPU or GPU) with torch tensors in and out.

Patch score = mean of the squared L2 distances to the k nearest bank vectors, which is what the
original's ``NearestNeighbourScorer`` computes from ``IndexFlatL2.search``.
"""

from __future__ import annotations

import logging
import os
import warnings

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take and return torch tensors)
import torch

__all__ = ["MemoryBank", "gpu_faiss_available"]

log = logging.getLogger(__name__)


def gpu_faiss_available() -> bool:
    """True when both this faiss build and torch see a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


class MemoryBank:
    """An exact L2 index over (M, D) float32 vectors.

    Args:
        index: a faiss ``IndexFlatL2`` (CPU); moved to GPU ``device`` when that is a CUDA device
            and faiss can use it.
        device: where searches run; queries are moved there, results come back on the queries' device.
    """

    def __init__(self, index: faiss.Index, device: torch.device | str = "cpu") -> None:
        if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_L2:
            raise TypeError(f"memory bank must be an exact L2 faiss index (IndexFlatL2), got {type(index).__name__}")
        self.cpu_index = index
        self.device = torch.device(device)
        self._resources = None
        self.index = index
        if self.device.type == "cuda":
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, self.device.index or 0, index)

    @property
    def dim(self) -> int:
        return self.cpu_index.d

    def __len__(self) -> int:
        return self.cpu_index.ntotal

    @classmethod
    def from_features(cls, features: torch.Tensor, device: torch.device | str = "cpu") -> MemoryBank:
        """A bank holding the rows of ``features`` (M, D)."""
        M, D = features.shape
        index = faiss.IndexFlatL2(D)
        index.add(features.detach().to("cpu", torch.float32).contiguous())
        return cls(index, device)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> MemoryBank:
        """Read a faiss index written by ``faiss.write_index`` (the original's ``.faiss`` file)."""
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot read faiss index {path}: {reason}") from None
        try:
            return cls(index, device)
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
        distances, _ = self.index.search(x, k)  # (N, k)
        return distances.to(queries.device)

    def patch_scores(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Mean squared L2 distance to the k nearest bank vectors. (N, D) → (N,)"""
        return self.search(queries, k).mean(dim=1)


def warn_gpu_unavailable() -> None:
    warnings.warn("faiss_on_gpu=true but faiss or torch sees no GPU: the memory bank stays on the CPU", stacklevel=2)
