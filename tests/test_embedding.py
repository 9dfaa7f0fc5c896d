"""Patch features against the original's reshape chain (transcribed in original_oracle), and the
fused pooling against unfold + ``adaptive_avg_pool1d`` bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchcore_lightning.embedding import (
    _patchify_channels_last,
    _pooled_patches,
    adaptive_avg_pool_channels,
    aggregate_layers,
    embed,
    patch_grid,
    patchify,
)

from . import original_oracle as oracle


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
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


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
    ours = _pooled_patches(feats, patchsize, stride, size)  # (B, size, h', w')
    assert torch.equal(ours.permute(0, 2, 3, 1), expected)


@pytest.mark.parametrize(
    "shapes, patchsize, pre, target",
    [
        ([(2, 12, 9, 9), (2, 20, 9, 9)], 3, 64, 48),  # equal grids: both layers fused
        ([(2, 8, 12, 12), (2, 16, 6, 6), (2, 4, 3, 3)], 3, 40, 24),  # coarser layers resized
        ([(1, 6, 10, 9), (1, 10, 5, 5)], 5, 33, 70),  # p = 5, non-square, pooling grows
        ([(1, 8, 8, 8), (1, 64, 4, 4)], 3, 64, 24),  # windows of one channel's block: shifted maps resized
        ([(1, 6, 10, 9), (1, 64, 5, 5)], 5, 64, 12),  # the same with p = 5
        ([(1, 6, 10, 9), (1, 10, 5, 5)], 5, 10, 12),  # one channel's block, but 10 channels: blocks resized
        ([(1, 8, 8, 8), (1, 64, 4, 4)], 3, 40, 2),  # final windows of one whole layer each
        ([(1, 8, 8, 8)], 3, 40, 1),  # one layer pooled to its mean
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
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)  # its resizing layout rounds differently
    assert torch.equal(ours, aggregate_layers([patchify(m, 3) for m in maps], 1024, 1024))
    channels_last, _ = embed([m.contiguous(memory_format=torch.channels_last) for m in maps], 3, 1, 1024, 1024)
    assert torch.equal(channels_last, ours)


@pytest.mark.parametrize(
    "shape, patchsize, stride", [((2, 5, 9, 7), 3, 1), ((1, 4, 12, 11), 3, 2), ((2, 3, 6, 6), 5, 1)]
)
def test_channels_last_patchify_is_patchify(shape, patchsize, stride):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    blocks = _patchify_channels_last(x, patchsize, stride)
    assert blocks.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(blocks, patchify(x, patchsize, stride))


@pytest.mark.parametrize(
    "C, patchsize, pre",
    [
        (256, 3, 128),  # windows of 18 entries (two whole channels): slices of 64 channels
        (256, 3, 768),  # windows of 3 entries, inside a channel
        (128, 5, 100),  # p = 5, windows of 32 entries
        (200, 3, 1024),  # 1800 → 1024: groups of 225 entries, one slice holds them all
    ],
)
@pytest.mark.parametrize("chunk_bytes", [1, 100_000, 1 << 30])
def test_resizing_in_channel_slices_is_bit_for_bit_and_bounded(monkeypatch, C, patchsize, pre, chunk_bytes):
    g = torch.Generator().manual_seed(C + pre)
    maps = [torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, C, 4, 4, generator=g)]
    expected = aggregate_layers([patchify(m, patchsize) for m in maps], pre, 48)
    resized = []  # bytes of every resized slice
    interpolate = F.interpolate

    def recording(x, *args, **kwargs):
        out = interpolate(x, *args, **kwargs)
        resized.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(F, "interpolate", recording)
    ours, _ = embed(maps, patchsize, 1, pre, 48, chunk_bytes=chunk_bytes)
    assert torch.equal(ours, expected)
    entry_bytes = 2 * 8 * 8 * 4  # one block entry resized to the 8 x 8 grid, both images
    smallest = (64 if pre != 1024 else C) * patchsize**2 * entry_bytes  # a slice holds at least 64 channels
    assert sum(resized) == C * patchsize**2 * entry_bytes  # every entry resized once
    assert max(resized) <= max(chunk_bytes, smallest)
    assert len(resized) == (1 if chunk_bytes == 1 << 30 or pre == 1024 else -(-sum(resized) // max(resized)))


def test_one_channel_windows_never_build_the_blocks(monkeypatch):
    """WideResNet50's layer3 to 1024 (windows of one channel's 3x3 block, 64 | C): the shifted maps are
    resized and summed; no (B, C*p*p, h, w) blocks are made (they are 9x the layer, 29 MB resized)."""
    from patchcore_lightning import embedding

    g = torch.Generator().manual_seed(5)
    maps = [torch.randn(1, 32, 8, 8, generator=g), torch.randn(1, 128, 4, 4, generator=g)]
    expected = aggregate_layers([patchify(m, 3) for m in maps], 128, 64)

    def refuse(*args, **kwargs):
        raise AssertionError("blocks built")

    monkeypatch.setattr(embedding, "_patchify_channels_last", refuse)
    ours, _ = embed(maps, 3, 1, 128, 64)
    assert torch.equal(ours, expected)


def test_final_windows_inside_one_layer_skip_the_stacked_features(monkeypatch):
    """IM224_WR50's 2 x 1024 → 1024: every final window (2 entries) lies inside one layer, so each
    layer is pooled on its own, straight into the output; windows across layers stack them first."""
    from patchcore_lightning import embedding

    g = torch.Generator().manual_seed(9)
    maps = [torch.randn(1, 32, 8, 8, generator=g), torch.randn(1, 128, 4, 4, generator=g)]
    per_layer = aggregate_layers([patchify(m, 3) for m in maps], 128, 64)  # 256 → 64: windows of 4 entries
    across = aggregate_layers([patchify(m, 3) for m in maps], 120, 7)  # 240 → 7: window 3 spans both

    layer_rows = embedding._layer_rows
    widths = []  # the width of every layer's rows: pretrain_dim when stacked, its output columns when not

    def recording(*args, **kwargs):
        rows = layer_rows(*args, **kwargs)
        widths.append(rows.shape[-1])
        return rows

    monkeypatch.setattr(embedding, "_layer_rows", recording)
    monkeypatch.setattr(embedding, "adaptive_avg_pool_channels", _refusing_wide(embedding.adaptive_avg_pool_channels))
    ours, _ = embed(maps, 3, 1, 128, 64)
    assert torch.equal(ours, per_layer) and ours.is_contiguous() and widths == [32, 32]
    widths.clear()
    ours, _ = embed(maps, 3, 1, 120, 7)
    assert torch.equal(ours, across) and widths == [120, 120]


def _refusing_wide(pool):
    """``pool``, except that pooling the stacked features of both layers (256 → 64) is an error."""

    def checked(x, size):
        if (x.shape[1], size) == (256, 64):
            raise AssertionError("the stacked features were pooled")
        return pool(x, size)

    return checked
