"""Patch features against the original's reshape chain (transcribed in original_oracle) and the
literal chain, and the fused pooling against unfold + ``adaptive_avg_pool1d`` bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchcore_lightning.embedding import (
    adaptive_avg_pool_channels,
    aggregate_layers,
    embed,
    patch_grid,
    patchify,
    pooled_patches,
)

from . import original_oracle as oracle
from .bounds import embed_bound

pytestmark = pytest.mark.kernels  # repeated by .ci/run under other CPU kernels


@pytest.mark.parametrize(
    "shapes, patchsize, pre, target",
    [
        ([(2, 8, 12, 12), (2, 16, 6, 6)], 3, 40, 24),  # later layer upsampled, pooling shrinks
        ([(1, 4, 10, 10), (1, 6, 5, 5), (1, 3, 3, 3)], 3, 50, 70),  # three layers, pooling grows
        ([(2, 5, 9, 7), (2, 5, 9, 7)], 5, 33, 17),  # equal grids, non-square, p = 5
        ([(1, 6, 8, 8)], 1, 6, 6),  # one layer, p = 1: the features themselves
    ],
)
def test_embed_equals_the_original_chain(shapes, patchsize, pre, target):
    g = torch.Generator().manual_seed(len(shapes) * 7 + patchsize)
    maps = [torch.randn(s, generator=g) for s in shapes]
    layers = [f"l{i}" for i in range(len(maps))]
    expected, ref = oracle.embed(dict(zip(layers, maps)), layers, patchsize, pre, target)
    ours, grid = embed(maps, patchsize, 1, pre, target)
    assert list(grid) == list(ref)
    # the oracle resizes each block entry as a one-channel image: other kernels, bounded by embed_bound
    assert bool(((ours - expected).abs() <= embed_bound(maps, patchsize, pre, target)).all())


def test_patchify_blocks_are_zero_padded_neighbourhoods_in_c_p_p_order():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    blocks = patchify(x, 3)  # (1, 2*9, 4, 4)
    padded = F.pad(x, (1, 1, 1, 1))
    for i in range(4):
        for j in range(4):
            assert torch.equal(blocks[0, :, i, j], padded[0, :, i : i + 3, j : j + 3].reshape(-1))
    assert patch_grid(28, 3, 1) == 28 and patch_grid(28, 2, 1) == 27 and patch_grid(28, 3, 2) == 14


@pytest.mark.parametrize(
    "n, size",
    [(4608, 1024), (9216, 1024), (2048, 1024), (50, 70), (33, 17), (9, 9), (5, 12), (1000, 999), (9216, 1000), (7, 1)],
)
def test_channel_pooling_is_adaptive_avg_pool1d_bit_for_bit(n, size):
    # (1000, 999) and (9216, 1000) have more than _MAX_PHASES phases: the gather path.
    x = torch.randn(2, n, 3, 5, generator=torch.Generator().manual_seed(n + size))
    expected = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, n), size)  # (B*3*5, 1, size)
    expected = expected.view(2, 3, 5, size).permute(0, 3, 1, 2)
    assert torch.equal(adaptive_avg_pool_channels(x, size), expected)
    # rows (N, n): short windows by strided sums, long ones (more than _POOL1D_ABOVE entries) by torch's kernel
    rows = x.permute(0, 2, 3, 1).reshape(-1, n)  # (B*3*5, n)
    assert torch.equal(adaptive_avg_pool_channels(rows, size), expected.permute(0, 2, 3, 1).reshape(-1, size))


@pytest.mark.parametrize(
    "C, patchsize, stride, size, grid",
    [
        (512, 3, 1, 1024, (28, 28)),  # WideResNet50 layer2 → 1024: fused, two phases
        (1024, 3, 1, 1024, (14, 14)),  # layer3 → 1024: fused, one phase (a 3x3 box filter)
        (8, 3, 2, 40, (12, 11)),  # stride 2
        (6, 5, 1, 12, (9, 7)),  # p = 5, 150 → 12: two overlapping windows of 13 per channel
        (16, 1, 1, 8, (6, 6)),  # p = 1
        (4, 3, 1, 2, (5, 5)),  # a window spans two whole channels
        (4, 3, 1, 18, (5, 5)),  # windows of 2 entries, not whole channels: unfold, then pool
        (7, 3, 1, 50, (4, 6)),  # 63 → 50: many phases, unfold and the gather path
        (3, 3, 1, 1, (4, 4)),  # → 1: torch's global mean
    ],
)
def test_fused_patch_pooling_is_unfold_then_pool_bit_for_bit(C, patchsize, stride, size, grid):
    feats = torch.randn(2, C, *grid, generator=torch.Generator().manual_seed(C + size))
    blocks = patchify(feats, patchsize, stride)  # (B, C*p*p, h', w')
    B, n, h, w = blocks.shape
    expected = F.adaptive_avg_pool1d(blocks.permute(0, 2, 3, 1).reshape(-1, 1, n), size).view(B, h, w, size)
    ours = pooled_patches(feats, patchsize, stride, size)  # (B, size, h', w')
    assert torch.equal(ours.permute(0, 2, 3, 1), expected)


@pytest.mark.parametrize(
    "shapes, patchsize, pre, target",
    [
        ([(2, 12, 9, 9), (2, 20, 9, 9)], 3, 64, 48),  # equal grids: nothing resized
        ([(2, 8, 12, 12), (2, 16, 6, 6), (2, 4, 3, 3)], 3, 40, 24),  # coarser layers resized
        ([(1, 6, 10, 9), (1, 10, 5, 5)], 5, 33, 70),  # p = 5, non-square, pooling grows
        ([(1, 8, 8, 8), (1, 64, 4, 4)], 3, 64, 24),  # windows of one channel's block: shifted maps resized
        ([(1, 6, 10, 9), (1, 64, 5, 5)], 5, 64, 12),  # the same with p = 5
        ([(1, 6, 10, 9), (1, 10, 5, 5)], 5, 10, 12),  # one channel's block, but 10 channels: blocks resized
        ([(1, 8, 8, 8), (1, 64, 4, 4)], 3, 40, 2),  # final windows of one whole layer each
        ([(1, 8, 8, 8)], 3, 40, 1),  # one layer pooled to its mean
        ([(2, 5, 9, 7)], 5, 33, 17),  # one layer, p = 5, many phases
    ],
)
def test_embed_is_the_literal_chain_bit_for_bit(shapes, patchsize, pre, target):
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(s, generator=g) for s in shapes]
    ours, grid = embed(maps, patchsize, 1, pre, target)
    assert grid == shapes[0][-2:] and ours.is_contiguous()
    assert torch.equal(ours, aggregate_layers([patchify(m, patchsize) for m in maps], pre, target))


def test_embed_wideresnet50_shapes_bit_for_bit():
    """layer2 (512, 28²) + layer3 (1024, 14²) → 1024 + 1024 → 1024, as IM224_WR50; channels_last maps too.

    The oracle resizes every block entry as a one-channel image, whose kernel rounds differently
    (≤ 2e-7 here); against the literal chain in one layout the features are bit-identical."""
    g = torch.Generator().manual_seed(50)
    maps = [torch.randn(1, 512, 28, 28, generator=g).relu(), torch.randn(1, 1024, 14, 14, generator=g).relu()]
    expected, _ = oracle.embed({"layer2": maps[0], "layer3": maps[1]}, ["layer2", "layer3"], 3, 1024, 1024)
    ours, grid = embed(maps, 3, 1, 1024, 1024)
    assert grid == (28, 28)
    assert bool(((ours - expected).abs() <= embed_bound(maps, 3, 1024, 1024)).all())  # its resizing layout rounds differently
    assert torch.equal(ours, aggregate_layers([patchify(m, 3) for m in maps], 1024, 1024))
    channels_last, _ = embed([m.contiguous(memory_format=torch.channels_last) for m in maps], 3, 1, 1024, 1024)
    assert torch.equal(channels_last, ours)


def test_fused_pooling_never_builds_the_blocks(monkeypatch):
    """Windows inside one channel's block (WideResNet50's 4608 → 1024 and 9216 → 1024): no unfold."""
    from patchcore_lightning import embedding

    g = torch.Generator().manual_seed(5)
    maps = [torch.randn(1, 32, 8, 8, generator=g), torch.randn(1, 128, 4, 4, generator=g)]
    expected = embed(maps, 3, 1, 64, 64)[0]

    def refuse(*args, **kwargs):
        raise AssertionError("blocks built")

    monkeypatch.setattr(embedding.F, "unfold", refuse)
    assert torch.equal(embed(maps, 3, 1, 64, 64)[0], expected)
