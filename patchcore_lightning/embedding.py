"""Locally aware patch features: the original PatchCore's ``_embed`` as pure tensor functions.

Notation: B images, C channels of a layer, p the patch size, (h, w) a layer's grid, (H0, W0) the
grid of the first requested layer, N = B * H0 * W0 patches, L layers, D dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["aggregate_layers", "embed", "patch_grid", "patchify"]


def patch_grid(size: int, patchsize: int, stride: int) -> int:
    """Number of patches along one side of a grid of ``size`` positions (zero padding (p-1)//2)."""
    padding = (patchsize - 1) // 2
    return (size + 2 * padding - patchsize) // stride + 1


def patchify(feats: torch.Tensor, patchsize: int, stride: int = 1) -> torch.Tensor:
    """Every position's p×p neighbourhood, as channels in (C, p, p) order.

    (B, C, h, w) → (B, C*p*p, h', w') with h' = patch_grid(h, p, stride).
    """
    B, C, h, w = feats.shape
    padding = (patchsize - 1) // 2
    blocks = F.unfold(feats, kernel_size=patchsize, stride=stride, padding=padding)  # (B, C*p*p, h'*w')
    return blocks.view(B, C * patchsize * patchsize, patch_grid(h, patchsize, stride), patch_grid(w, patchsize, stride))


def _pool_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool1d`` over the last dimension: (N, n) → (N, size)."""
    return F.adaptive_avg_pool1d(x.unsqueeze(1), size).squeeze(1)


def aggregate_layers(blocks: Sequence[torch.Tensor], pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """Patch blocks of L layers → one (N, target_dim) feature per patch.

    ``blocks[i]`` is (B, C_i*p*p, h_i, w_i). Every later layer is resized to the first layer's grid
    (bilinear, align_corners=False, each block entry a channel of its own), each patch's block is
    pooled to ``pretrain_dim`` (adaptive average over the flattened (C, p, p) block), the layers
    are stacked (L, pretrain_dim) and pooled again to ``target_dim``.
    """
    B, _, H0, W0 = blocks[0].shape
    pooled = []
    for block in blocks:
        if block.shape[-2:] != (H0, W0):
            block = F.interpolate(block, size=(H0, W0), mode="bilinear", align_corners=False)
        flat = block.permute(0, 2, 3, 1).reshape(B * H0 * W0, -1)  # (N, C*p*p), row-major over (B, H0, W0)
        pooled.append(_pool_last(flat, pretrain_dim))  # (N, pretrain_dim)
    stacked = torch.stack(pooled, dim=1)  # (N, L, pretrain_dim)
    return _pool_last(stacked.reshape(len(stacked), -1), target_dim)  # (N, target_dim)


def embed(
    layer_feats: Sequence[torch.Tensor], patchsize: int, stride: int, pretrain_dim: int, target_dim: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Backbone layer maps [(B, C_i, h_i, w_i)] → patch features (B*H0*W0, target_dim) and (H0, W0)."""
    blocks = [patchify(f, patchsize, stride) for f in layer_feats]
    H0, W0 = blocks[0].shape[-2:]
    return aggregate_layers(blocks, pretrain_dim, target_dim), (H0, W0)
