"""Patch scores → segmentation maps, and the min-max normalisation of a member.

The blur equals ``scipy.ndimage.gaussian_filter(x, sigma, truncate=4.0, mode="reflect")`` (the
original's segmentor), computed in torch on the scores' device, in float32 products even where the
backbone may use TF32 (``precision``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .precision import full_float32

__all__ = ["gaussian_blur", "gaussian_kernel1d", "minmax_normalise", "minmax_scale", "segmentation_maps"]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """scipy's kernel: radius int(truncate*sigma + 0.5), weights exp(-x²/2σ²) summing to 1. (2r+1,)"""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


@lru_cache(maxsize=64)
def _device_kernel(sigma: float, truncate: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``gaussian_kernel1d`` on ``device`` as ``dtype``, built once per (sigma, truncate, device, dtype):
    a forward then never waits for a host-to-device copy. Shared: read it, never write it. (1, 1, 2r+1)"""
    return gaussian_kernel1d(sigma, truncate).to(device, dtype).view(1, 1, -1)


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded by ``radius`` with scipy's 'reflect' (d c b a | a b c d | d c b a)."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)  # (n + 2r,)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, scipy 'reflect' borders, any map size. → (B, H, W)"""
    B, H, W = maps.shape
    kernel = _device_kernel(float(sigma), float(truncate), maps.device, maps.dtype)  # (1, 1, 2r+1)
    r = (kernel.shape[-1] - 1) // 2
    with full_float32():  # float32 products even where the backbone may use TF32 (precision)
        x = maps.index_select(2, _reflect_index(W, r, maps.device))  # (B, H, W + 2r)
        x = F.conv1d(x.reshape(B * H, 1, -1), kernel).view(B, H, W)
        x = x.index_select(1, _reflect_index(H, r, maps.device))  # (B, H + 2r, W)
        x = x.transpose(1, 2).reshape(B * W, 1, -1)  # (B*W, 1, H + 2r)
        return F.conv1d(x, kernel).view(B, W, H).transpose(1, 2).contiguous()


def segmentation_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Grid of patch scores (B, h, w) → bilinear to ``size`` (align_corners=False), then blurred. (B, H, W)"""
    up = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)  # (B, 1, H, W)
    return gaussian_blur(up.squeeze(1), sigma)


def minmax_normalise(x: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """(x - min) / (max - min) over ``dim`` (all but the first dimension when None), as the original.

    A member whose scores are all equal carries no ranking; it is mapped to zeros rather than the
    original's NaN, and the caller is expected to warn.
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    return minmax_scale(x, lo, hi - lo)


def minmax_scale(x: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """(x - lo) / span with given ``lo`` and ``span`` (broadcast against ``x``), zeros where span is 0:
    ``minmax_normalise``'s arithmetic, for statistics taken over more than ``x``."""
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.zeros_like(x))
