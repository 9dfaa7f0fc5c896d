"""Patch features against the original's reshape chain (transcribed in original_oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchcore_lightning.embedding import embed, patch_grid, patchify

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
