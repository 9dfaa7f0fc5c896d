"""Full float32 for the computations whose guarantees TF32 would break.

``--model.allow_tf32`` lets cuDNN and cuBLAS round the inputs of products to TF32's 10-bit mantissa
(2^-11, about 8,000 times float32's 2^-24): a speed-up for the backbone's convolutions, which the
user trades against its rounding. Two computations after the backbone must not take that trade:

- the torch search's candidate products (``memory_bank``): TF32 moves ``|x|² + |y|² - 2 x·y`` by
  ~1e-3 of ``|x|²``, more than the gaps between a query's nearest rows, so the candidates would
  miss them and the exact re-ranking would rank the wrong rows;
- the Gaussian blur of the maps (``anomaly_map``), a convolution: every map value would move by
  ~1e-3 of itself, for no speed that matters (it is a small part of a forward).

``tf32(allowed)`` sets both flags for one block and gives the caller's back after it;
``full_float32()`` is its float32 case.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

__all__ = ["full_float32", "tf32"]


@contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """cuDNN convolutions and cuBLAS products with TF32 ``allowed`` or not inside the block; torch's
    two flags are the caller's again after it. The flags only act on CUDA devices, and they are the
    process's: a convolution another thread runs meanwhile follows them too."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def full_float32() -> AbstractContextManager[None]:
    """Float32 products (no TF32) inside the block, the caller's flags after it: ``tf32(False)``. Another
    thread's convolution meanwhile is float32 too (slower, never less exact)."""
    return tf32(False)
