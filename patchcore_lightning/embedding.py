"""Locally aware patch features: the original PatchCore's ``_embed`` as pure tensor functions.

Notation: B images, C channels of a layer, p the patch size, (h, w) a layer's grid, (H0, W0) the
grid of the first requested layer, N = B * H0 * W0 patches, L layers, D dimensions.

The original unfolds every layer into (C*p*p)-long blocks per position, resizes the later layers'
blocks to the first grid, and average-pools each block to ``pretrain_dim`` with
``adaptive_avg_pool1d``. ``embed`` computes the same numbers with much less work:

- ``adaptive_avg_pool1d`` from n to m averages the windows [floor(i*n/m), ceil((i+1)*n/m)). With
  n = a*g and m = b*g (g = gcd(n, m)) output i = q*b + r starts at q*a + floor(r*a/b) and has a
  width that depends on r only, so the pooling is b strided sums of a few shifted slices.
- A block entry j = c*p*p + ky*p + kx is the zero-padded map at channel c shifted by (ky, kx); when
  a is a multiple of p*p, window r of group q reads channels q*a/(p*p) + const of one shifted
  map, so pooling is fused with the patch extraction (``_pooled_patches``): nothing of size
  C*p*p per position is ever materialised for the first layer (and any layer on its grid).
- Later layers on coarser grids are unfolded and resized as the original does, but in
  channels_last memory (torch's bilinear kernel is then ~9x faster on a CPU and bit-identical),
  and pooled over the contiguous block of each position.
- The layers are stacked per patch and pooled again to ``target_dim``; when no window of that
  pooling spans two layers (WideResNet50's 2 x 1024 → 1024), each layer is pooled on its own,
  straight into its columns of the output.

Every sum runs in the order ``adaptive_avg_pool1d`` runs it: the features are bit-identical to the
original's chain (``aggregate_layers``), not merely close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["adaptive_avg_pool_channels", "aggregate_layers", "embed", "patch_grid", "patchify"]

# Above this many window phases b the strided sums become many small ops; gather instead.
_MAX_PHASES = 16
# A (B, n) input is pooled by torch's kernel when its windows average more than this many entries
# (measured: 9216 -> 1024 is 2x faster there, 2048 -> 1024 6x slower than by strided sums).
_POOL1D_ABOVE = 5
# Largest slice of a later layer's resized blocks held at once: the whole of WideResNet50's
# layer3 is 29 MB per 224² image, which would stay in the process's RSS and out of the caches.
RESIZE_CHUNK_BYTES = 4 << 20


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


@lru_cache(maxsize=64)
def _phases(n: int, size: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """``adaptive_avg_pool1d`` n → size as (a, b, ((start, width) of phase r, ...)): n = a*g, size = b*g."""
    g = math.gcd(n, size)
    a, b = n // g, size // g
    # Output q*b + r covers [q*a + floor(r*a/b), q*a + ceil((r+1)*a/b)): never beyond its group.
    return a, b, tuple(((r * a) // b, -((-(r + 1) * a) // b) - (r * a) // b) for r in range(b))


@lru_cache(maxsize=64)
def _widths(n: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Window widths of the b phases, (b,), kept on ``device`` (no host-to-device copy per batch)."""
    with torch.inference_mode(False):  # cached: a normal tensor, usable outside inference mode too
        return torch.tensor([w for _, w in _phases(n, size)[2]], dtype=dtype).to(device)


@lru_cache(maxsize=16)
def _windows(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every window's start and width (size,) on ``device``, and the largest width."""
    with torch.inference_mode(False):
        i = torch.arange(size)
        starts = (i * n) // size
        widths = ((i + 1) * n + size - 1) // size - starts
        return starts.to(device), widths.to(device), int(widths.max())


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
        rows = x.reshape(B, n, -1).transpose(1, 2).reshape(-1, 1, n)  # (B*S, 1, n), a view when S = 1
        return F.adaptive_avg_pool1d(rows, size).view(B, -1, size).transpose(1, 2).reshape(B, size, *rest)
    if not rest:  # short windows over the last dimension: the sums below, over a trailing 1 (6x faster for 2 -> 1)
        return adaptive_avg_pool_channels(x.unsqueeze(-1), size).squeeze(-1)
    a, b, phases = _phases(n, size)
    g = n // a
    if b <= _MAX_PHASES:
        groups = x.reshape(B, g, a, -1)  # (B, g, a, S)
        out = x.new_empty(B, g, b, groups.shape[-1])  # (B, g, b, S)
        for r, (start, width) in enumerate(phases):
            acc = out[:, :, r]
            acc.copy_(groups[:, :, start])
            for t in range(1, width):
                acc.add_(groups[:, :, start + t])
        return out.div_(_widths(n, size, x.dtype, x.device).view(1, 1, b, 1)).view(B, size, *rest)
    # Many phases (n and size nearly coprime): one gather per window offset over all windows.
    flat = x.reshape(B, n, -1)  # (B, n, S)
    starts, widths, widest = _windows(n, size, x.device)  # (size,), (size,)
    out = flat.index_select(1, starts)  # (B, size, S)
    for t in range(1, widest):
        # Windows at least t+1 wide get their entry t; the others a zero (adding 0.0 is exact).
        entry = flat.index_select(1, (starts + t).clamp_max_(n - 1))  # (B, size, S)
        out.add_(torch.where((widths > t).view(1, size, 1), entry, 0.0))
    return out.div_(widths.to(x.dtype).view(1, size, 1)).view(B, size, *rest)


def _padded(feats: torch.Tensor, patchsize: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """The zero-padded maps and the patch grid: (B, C, h, w) → (B, C, h + 2pad, w + 2pad), H, W."""
    pad = (patchsize - 1) // 2
    h, w = feats.shape[-2:]
    return F.pad(feats, (pad, pad, pad, pad)), patch_grid(h, patchsize, stride), patch_grid(w, patchsize, stride)


def _shifted(padded: torch.Tensor, ky: int, kx: int, stride: int, H: int, W: int) -> torch.Tensor:
    """Block entry (ky, kx) of every patch: the padded maps (..., h + 2pad, w + 2pad) read at the
    patch positions shifted by (ky, kx). → (..., H, W), a view"""
    return padded[..., ky : ky + stride * (H - 1) + 1 : stride, kx : kx + stride * (W - 1) + 1 : stride]


def _patchify_channels_last(feats: torch.Tensor, patchsize: int, stride: int = 1) -> torch.Tensor:
    """``patchify(feats, p, stride)`` in channels_last memory: (B, C*p*p, h', w'), each block contiguous."""
    B, C = feats.shape[:2]
    padded, H, W = _padded(feats, patchsize, stride)  # (B, C, h + 2pad, w + 2pad)
    out = feats.new_empty(B, H, W, C, patchsize * patchsize)  # (B, H, W, C, p*p): entry c*p*p + ky*p + kx
    for ky in range(patchsize):
        for kx in range(patchsize):
            out[..., ky * patchsize + kx] = _shifted(padded, ky, kx, stride, H, W).permute(0, 2, 3, 1)
    return out.view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, C*p*p, H, W), channels_last


def _pooled_patches(feats: torch.Tensor, patchsize: int, stride: int, size: int) -> torch.Tensor:
    """``adaptive_avg_pool_channels(patchify(feats, p, stride), size)`` without building the blocks.

    (B, C, h, w) → (B, size, h', w').
    """
    B, C = feats.shape[:2]
    p2 = patchsize * patchsize
    a, b, phases = _phases(C * p2, size)
    if size == 1 or a % p2 or b > _MAX_PHASES:  # windows not of whole channels, or a mean: pool the blocks
        return adaptive_avg_pool_channels(patchify(feats, patchsize, stride), size)
    per_group = a // p2  # channels per group of a block entries
    g = C // per_group  # groups
    padded, H, W = _padded(feats.contiguous(), patchsize, stride)  # (B, C, h + 2pad, w + 2pad)

    def entry(j: int) -> torch.Tensor:
        """Block entry j of every group: channels j//p² + k*per_group, shifted by (ky, kx). (B, g, H, W)"""
        c, (ky, kx) = j // p2, divmod(j % p2, patchsize)
        return _shifted(padded[:, c::per_group], ky, kx, stride, H, W)

    out = feats.new_empty(B, g, b, H, W)  # (B, g, b, H, W): output channel q*b + r
    for r, (start, width) in enumerate(phases):
        acc = out[:, :, r]
        acc.copy_(entry(start))
        for t in range(1, width):
            acc.add_(entry(start + t))
    return out.div_(_widths(C * p2, size, feats.dtype, feats.device).view(1, 1, b, 1, 1)).view(B, size, H, W)


def aggregate_layers(blocks: Sequence[torch.Tensor], pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """Patch blocks of L layers → one (N, target_dim) feature per patch, in the original's order.

    ``blocks[i]`` is (B, C_i*p*p, h_i, w_i). Every later layer is resized to the first layer's grid
    (bilinear, align_corners=False, each block entry a channel of its own), each patch's block is
    pooled to ``pretrain_dim`` (adaptive average over the flattened (C, p, p) block), the layers
    are stacked (L, pretrain_dim) and pooled again to ``target_dim``. The literal reading of the
    original (slow: it materialises and resizes every block); ``embed`` gives the same bits.
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


def _resized_pooled_patches(
    feats: torch.Tensor, patchsize: int, stride: int, grid: tuple[int, int], size: int, chunk_bytes: int
) -> torch.Tensor:
    """A layer on a coarser grid: blocks resized to ``grid``, then pooled. (B, C, h, w) → (B, H0*W0, size)

    The original resizes every block entry, then pools; pooling first would reorder float sums.
    The blocks are resized in channels_last (bit-identical to the channels-first kernel, and ~9x
    faster on a CPU), a slice of channels at a time so that no more than ``chunk_bytes`` of resized
    blocks exist at once. Slices hold whole pooling groups (a window never crosses a group), whole
    channels and a multiple of 64 entries (the resize kernel's vector blocks line up with those
    of the whole), so every output is summed from the same values in the same order.
    """
    B, C = feats.shape[:2]
    H0, W0 = grid
    p2 = patchsize * patchsize
    a, b, _ = _phases(C * p2, size)
    if a == p2 and b == 1 and C % 64 == 0:  # every window is one channel's block (WideResNet50's layer3 to 1024)
        return _resized_block_means(feats, patchsize, stride, grid)
    unit = math.lcm(a, p2, 64) // p2  # channels per smallest slice
    per_channel = B * H0 * W0 * p2 * feats.element_size()  # bytes of one channel's resized blocks
    step = max(unit, chunk_bytes // per_channel // unit * unit)  # channels per slice
    out = feats.new_empty(B, H0 * W0, size)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        blocks = _patchify_channels_last(feats[:, c0:c1], patchsize, stride)  # (B, n', h, w)
        blocks = F.interpolate(blocks, size=grid, mode="bilinear", align_corners=False)  # (B, n', H0, W0)
        rows = blocks.permute(0, 2, 3, 1).reshape(B * H0 * W0, -1)  # (N, n'): a view, channels_last
        o0, o1 = c0 * p2 // a * b, c1 * p2 // a * b  # outputs of the slice's groups (c1 * p2 is a multiple of a)
        out[:, :, o0:o1] = adaptive_avg_pool_channels(rows, o1 - o0).view(B, H0 * W0, o1 - o0)
    return out


def _resized_block_means(feats: torch.Tensor, patchsize: int, stride: int, grid: tuple[int, int]) -> torch.Tensor:
    """``_resized_pooled_patches`` when every window is one channel's p×p block: (B, C, h, w) → (B, H0*W0, C).

    The pooled value of channel c is the sum of its p² resized block entries in block order, divided
    by p². Entry k of every channel is the padded map shifted by (ky, kx); resizing is per channel,
    so the entries are resized a whole shifted map at a time and summed in that order: the same
    bits, without the (B, C*p*p, H0, W0) blocks. The caller makes sure C is a multiple of 64: the
    channels_last resize kernel rounds its vector lanes and its scalar tail differently, and with
    64 | C no channel of either layout falls in a tail.
    """
    B, C = feats.shape[:2]
    # Zero-padded in channels_last memory (F.pad keeps the layout): one transposing copy of the layer;
    # every shifted map is then copied out as rows of contiguous channels (transposing each of the p²
    # maps took 2x longer).
    padded, H, W = _padded(feats.contiguous(memory_format=torch.channels_last), patchsize, stride)
    total = None
    for ky in range(patchsize):
        for kx in range(patchsize):
            shifted = _shifted(padded, ky, kx, stride, H, W)  # (B, C, H, W)
            shifted = shifted.contiguous(memory_format=torch.channels_last)
            resized = F.interpolate(shifted, size=grid, mode="bilinear", align_corners=False)  # (B, C, H0, W0)
            total = resized if total is None else total.add_(resized)
    total = total.div_(patchsize * patchsize).contiguous(memory_format=torch.channels_last)
    return total.permute(0, 2, 3, 1).reshape(B, grid[0] * grid[1], C)  # a view of the channels_last sums


def embed(
    layer_feats: Sequence[torch.Tensor],
    patchsize: int,
    stride: int,
    pretrain_dim: int,
    target_dim: int,
    chunk_bytes: int = RESIZE_CHUNK_BYTES,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Backbone layer maps [(B, C_i, h_i, w_i)] → patch features (B*H0*W0, target_dim) and (H0, W0).

    Contiguous, rows ordered (B, H0, W0) row-major, as the original's; bit for bit its numbers.
    ``chunk_bytes`` bounds the working memory of layers on coarser grids (the numbers do not depend on it).
    """
    B = layer_feats[0].shape[0]
    H0, W0 = (patch_grid(n, patchsize, stride) for n in layer_feats[0].shape[-2:])
    L = len(layer_feats)
    a, b, _ = _phases(L * pretrain_dim, target_dim)
    per_layer = pretrain_dim // a * b  # outputs per layer when no final window spans two layers
    # Stacked when a window spans two layers, or is a whole layer (pooled to 1, torch's kernel would
    # take its mean shortcut, summed in another order than a window of the stacked features).
    if pretrain_dim % a or per_layer == 1:
        stacked = layer_feats[0].new_empty(B, H0 * W0, L, pretrain_dim)  # per patch, layer after layer
        for i, feats in enumerate(layer_feats):
            stacked[:, :, i] = _layer_rows(feats, patchsize, stride, (H0, W0), pretrain_dim, pretrain_dim, chunk_bytes)
        return adaptive_avg_pool_channels(stacked.view(B * H0 * W0, -1), target_dim), (H0, W0)  # (N, target_dim)
    # Every final window lies inside one layer's pretrain_dim features: layer i's outputs are its own
    # features pooled to pretrain_dim*b/a (the same windows, summed in the same order), written in
    # place without the stacked (N, L*pretrain_dim) features.
    out = layer_feats[0].new_empty(B, H0 * W0, target_dim)
    for i, feats in enumerate(layer_feats):
        cols = slice(i * per_layer, (i + 1) * per_layer)
        out[:, :, cols] = _layer_rows(feats, patchsize, stride, (H0, W0), pretrain_dim, per_layer, chunk_bytes)
    return out.view(B * H0 * W0, target_dim), (H0, W0)


def _layer_rows(
    feats: torch.Tensor,
    patchsize: int,
    stride: int,
    grid: tuple[int, int],
    pretrain_dim: int,
    size: int,
    chunk_bytes: int,
) -> torch.Tensor:
    """One layer's patch features pooled to ``pretrain_dim``, then to ``size``: (B, C, h, w) → (B, H0*W0, size).

    A layer on the first grid is pooled while still in channels-first planes and transposed once.
    """
    B = feats.shape[0]
    h, w = (patch_grid(n, patchsize, stride) for n in feats.shape[-2:])
    if (h, w) == grid:
        x = _pooled_patches(feats, patchsize, stride, pretrain_dim)  # (B, pretrain_dim, H0, W0)
        if size != pretrain_dim:
            x = adaptive_avg_pool_channels(x, size)  # (B, size, H0, W0)
        return x.view(B, size, h * w).transpose(1, 2)
    rows = _resized_pooled_patches(feats, patchsize, stride, grid, pretrain_dim, chunk_bytes)  # (B, H0*W0, pd)
    if size != pretrain_dim:
        rows = adaptive_avg_pool_channels(rows.reshape(-1, pretrain_dim), size).view(B, -1, size)
    return rows
