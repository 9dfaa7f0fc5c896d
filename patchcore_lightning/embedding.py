"""Locally aware patch features: the original PatchCore's ``_embed`` as pure tensor functions.

Notation: B images, C channels of a layer, p the patch size, (h, w) a layer's grid, (H0, W0) the
grid of the first requested layer, N = B * H0 * W0 patches, L layers, D dimensions.

The original, per layer: every position's p×p neighbourhood as a (C, p, p) block (``patchify``),
the blocks of a later layer resized to the first layer's grid (bilinear, each block entry on its
own), each block average-pooled to ``pretrain_dim`` (``adaptive_avg_pool1d`` over the flattened
block); then the layers stacked per patch and pooled again to ``target_dim``. ``aggregate_layers``
is that chain, literally.

``embed`` computes the same features with far less work:

- ``adaptive_avg_pool1d`` from n to m averages the windows [floor(i*n/m), ceil((i+1)*n/m)). With
  n = a*g and m = b*g (g = gcd(n, m)) output i = q*b + r starts at q*a + floor(r*a/b) and has a
  width that depends on r only, so the pooling is b strided sums of a few shifted slices
  (``adaptive_avg_pool_channels``), summed in the kernel's order: the same bits.
- A block entry j = c*p*p + ky*p + kx is the zero-padded map at channel c shifted by (ky, kx);
  when a is a multiple of p*p, window r of group q reads channels q*a/(p*p) + const of one
  shifted map, so pooling is fused with the patch extraction (``pooled_patches``): the blocks,
  C*p*p values per position, are never made. Bit for bit the unfold-then-pool of the original.
- A later layer's block entries are resized one shifted map at a time (its groups' channels
  together), each just before it is added to its window's sum: the resized blocks (C*p*p maps on
  the first grid, 29 MB an image for WideResNet50's layer3) are never held, and the sums are the
  chain's, in its order. (Where a group's channels are not a multiple of 64, the blocks are resized
  whole: see ``_RESIZE_CHANNELS``.)

So ``embed`` gives ``aggregate_layers``' features bit for bit. (Pooling first and resizing the
pooled maps would be cheaper, and equal in exact arithmetic, but it reorders float sums: the
features move by ~2e-7 and the pixel AUROCs of a small test set by ~1e-6.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["adaptive_avg_pool_channels", "aggregate_layers", "embed", "patch_grid", "patchify", "pooled_patches"]

# Above this many window phases b the strided sums become many small ops; gather instead.
_MAX_PHASES = 16
# A later layer's block entries are resized a group of channels at a time only when the group holds
# a multiple of this many: the CPU's bilinear kernel vectorises across channels, so a subset of the
# channels gets the bits it gets inside the whole blocks only when both fill whole vectors.
_RESIZE_CHANNELS = 64
# Rows (B, n) are pooled by torch's kernel when its windows average more than this many entries
# (there it is faster than strided sums; for short windows, such as 2048 → 1024, it is several times slower).
_POOL1D_ABOVE = 5


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


def _phases(n: int, size: int) -> tuple[int, int, list[tuple[int, int]]]:
    """``adaptive_avg_pool1d`` n → size as (a, b, [(start, width) of phase r]): n = a*g, size = b*g."""
    g = math.gcd(n, size)
    a, b = n // g, size // g
    # Output q*b + r covers [q*a + floor(r*a/b), q*a + ceil((r+1)*a/b)): never beyond its group.
    return a, b, [((r * a) // b, -((-(r + 1) * a) // b) - (r * a) // b) for r in range(b)]


def adaptive_avg_pool_channels(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool1d`` over dimension 1, bit for bit: (B, n, *S) → (B, size, *S).

    Each window is summed left to right and divided by its width, as torch's kernel does.
    """
    B, n = x.shape[:2]
    rest = x.shape[2:]
    if n == size:
        return x.clone()
    if size == 1 or (not rest and n > _POOL1D_ABOVE * size):
        # torch's kernel: its global-mean shortcut, and long windows over a contiguous last dimension
        rows = x.reshape(B, n, -1).transpose(1, 2).reshape(-1, 1, n).contiguous()  # (B*S, 1, n): the kernel's order
        return F.adaptive_avg_pool1d(rows, size).view(B, -1, size).transpose(1, 2).reshape(B, size, *rest)
    if not rest:  # short windows over the last dimension: the sums below, over a trailing 1
        return adaptive_avg_pool_channels(x.unsqueeze(-1), size).squeeze(-1)
    a, b, phases = _phases(n, size)
    if b <= _MAX_PHASES:
        groups = x.reshape(B, n // a, a, -1)  # (B, g, a, S)
        out = x.new_empty(B, n // a, b, groups.shape[-1])  # (B, g, b, S): output q*b + r
        for r, (start, width) in enumerate(phases):
            acc = out[:, :, r]
            acc.copy_(groups[:, :, start])
            for t in range(1, width):
                acc.add_(groups[:, :, start + t])
            acc.div_(width)
        return out.view(B, size, *rest)
    # Many phases (n and size nearly coprime): one gather per window offset over all windows.
    flat = x.reshape(B, n, -1)  # (B, n, S)
    i = torch.arange(size, device=x.device)
    starts = (i * n) // size  # (size,)
    widths = ((i + 1) * n + size - 1) // size - starts  # (size,)
    out = flat.index_select(1, starts)  # (B, size, S)
    for t in range(1, -(-n // size) + 1):
        # Windows at least t+1 wide get their entry t; the others a zero (adding 0.0 is exact).
        entry = flat.index_select(1, (starts + t).clamp_max_(n - 1))  # (B, size, S)
        out.add_(torch.where((widths > t).view(1, size, 1), entry, 0.0))
    return out.div_(widths.to(x.dtype).view(1, size, 1)).view(B, size, *rest)


def _resize(x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, n, h, w) → (B, n, *grid), bilinear as the original resizes (``x`` itself on its grid)."""
    if grid is None or tuple(x.shape[-2:]) == tuple(grid):
        return x
    return F.interpolate(x.contiguous(), size=grid, mode="bilinear", align_corners=False)


def pooled_patches(
    feats: torch.Tensor, patchsize: int, stride: int, size: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """``adaptive_avg_pool_channels(resized(patchify(feats, p, stride)), size)``, where ``resized``
    resizes the blocks to ``grid`` (when given and not the layer's own), without making the blocks
    when every pooling window lies inside one channel's p×p block. (B, C, h, w) → (B, size, *grid)
    """
    B, C = feats.shape[:2]
    p2 = patchsize * patchsize
    a, b, phases = _phases(C * p2, size)
    H, W = (patch_grid(n, patchsize, stride) for n in feats.shape[-2:])
    grid = None if grid is None or tuple(grid) == (H, W) else tuple(grid)
    fused = size > 1 and a % p2 == 0 and b <= _MAX_PHASES  # else: windows across channels, or a mean
    if fused and grid is not None:
        fused = (C * p2 // a) % _RESIZE_CHANNELS == 0
    if not fused:  # pool the blocks
        return adaptive_avg_pool_channels(_resize(patchify(feats, patchsize, stride), grid), size)
    per_group = a // p2  # channels per group of a block entries
    pad = (patchsize - 1) // 2
    # (resized entries are cut from a channels_last copy: each is then a copy of whole rows of channels)
    layout = torch.contiguous_format if grid is None else torch.channels_last
    padded = F.pad(feats.contiguous(memory_format=layout), (pad, pad, pad, pad))  # (B, C, h + 2pad, w + 2pad)

    def entry(j: int) -> torch.Tensor:
        """Block entry j of every group: channels j//p² + k*per_group, shifted by (ky, kx), on the
        output grid. (B, g, *grid)"""
        c, (ky, kx) = j // p2, divmod(j % p2, patchsize)
        rows = slice(ky, ky + stride * (H - 1) + 1, stride)
        cols = slice(kx, kx + stride * (W - 1) + 1, stride)
        shifted = padded[:, c::per_group, rows, cols]
        if grid is None:
            return shifted
        # in channels_last, the CPU's fast bilinear kernel; with 64 | g it rounds as the blocks' resize
        shifted = shifted.contiguous(memory_format=torch.channels_last)
        return F.interpolate(shifted, size=grid, mode="bilinear", align_corners=False)

    g = C // per_group
    if grid is None:
        out = feats.new_empty(B, g, b, H, W)  # (B, g, b, H, W): output channel q*b + r
    else:  # channels innermost, as the resized entries are: they are added without a transpose
        out = feats.new_empty(B, b, *grid, g).permute(0, 4, 1, 2, 3)  # (B, g, b, *grid)
    for r, (start, width) in enumerate(phases):
        acc = out[:, :, r]
        acc.copy_(entry(start))
        for t in range(1, width):
            acc.add_(entry(start + t))
        acc.div_(width)
    return out.reshape(B, size, *out.shape[-2:])


def embed(
    layer_feats: Sequence[torch.Tensor], patchsize: int, stride: int, pretrain_dim: int, target_dim: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Backbone layer maps [(B, C_i, h_i, w_i)] → patch features (N, target_dim) and the grid (H0, W0).

    Contiguous, rows ordered (B, H0, W0) row-major, as the original's; ``aggregate_layers``' bits.
    """
    B = layer_feats[0].shape[0]
    H0, W0 = (patch_grid(n, patchsize, stride) for n in layer_feats[0].shape[-2:])
    per_layer = [pooled_patches(feats, patchsize, stride, pretrain_dim, (H0, W0)) for feats in layer_feats]
    stacked = torch.cat(per_layer, dim=1)  # (B, L*pretrain_dim, H0, W0): per patch, layer after layer
    pooled = adaptive_avg_pool_channels(stacked, target_dim)  # (B, target_dim, H0, W0)
    return pooled.permute(0, 2, 3, 1).reshape(B * H0 * W0, target_dim).contiguous(), (H0, W0)  # (N, target_dim)


def aggregate_layers(blocks: Sequence[torch.Tensor], pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """Patch blocks of L layers → one (N, target_dim) feature per patch: the original's chain, literally.

    ``blocks[i]`` is (B, C_i*p*p, h_i, w_i). Every later layer is resized to the first layer's grid
    (bilinear, align_corners=False, each block entry a channel of its own), each patch's block is
    pooled to ``pretrain_dim`` (adaptive average over the flattened (C, p, p) block), the layers
    are stacked (L, pretrain_dim) and pooled again to ``target_dim``. Slow: the reference ``embed``
    is tested against.
    """
    B, _, H0, W0 = blocks[0].shape
    pooled = []
    for block in blocks:
        if block.shape[-2:] != (H0, W0):
            block = F.interpolate(block, size=(H0, W0), mode="bilinear", align_corners=False)
        flat = block.permute(0, 2, 3, 1).reshape(B * H0 * W0, -1)  # (N, C*p*p), row-major over (B, H0, W0)
        pooled.append(F.adaptive_avg_pool1d(flat.unsqueeze(1), pretrain_dim).squeeze(1))  # (N, pretrain_dim)
    stacked = torch.stack(pooled, dim=1).flatten(1)  # (N, L*pretrain_dim)
    return F.adaptive_avg_pool1d(stacked.unsqueeze(1), target_dim).squeeze(1)  # (N, target_dim)
