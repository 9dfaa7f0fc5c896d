"""Segmentation maps against scipy's gaussian_filter and a direct bilinear upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from patchcore_lightning.anomaly_map import gaussian_blur, gaussian_kernel1d, minmax_normalise, segmentation_maps

from .bounds import F64, U


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 224, 224), (3, 20, 37), (1, 9, 5)])
@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_blur_equals_scipy_gaussian_filter(shape, sigma):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) * 50
    ours = gaussian_blur(maps, sigma).numpy()
    for i in range(shape[0]):
        expected = ndimage.gaussian_filter(maps[i].numpy().astype(np.float64), sigma=sigma, truncate=4.0, mode="reflect")
        # two passes of K-tap sums of non-negative float32 weights (each rounded once) on non-negative
        # values, in any order: within 2(K + 1) u of the result, pointwise; scipy's float64 adds ~0
        K = len(gaussian_kernel1d(sigma))
        np.testing.assert_allclose(ours[i], expected, rtol=(2 * (K + 1) + 2) * U, atol=0)


def test_kernel_matches_scipy_radius_and_weights():
    kernel = gaussian_kernel1d(4.0)
    assert len(kernel) == 33  # radius int(4 * 4 + 0.5) = 16
    impulse = np.zeros(101)
    impulse[50] = 1
    # both float64: exp within 4 ulp (numpy's and torch's own), a 33-term sum, one division, per side
    np.testing.assert_allclose(kernel.numpy(), ndimage.gaussian_filter1d(impulse, 4.0)[34:67], rtol=2 * (33 + 6) * F64, atol=0)


def test_segmentation_upsamples_bilinearly_then_blurs():
    patch = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(0))
    ours = segmentation_maps(patch, (56, 56)).numpy()
    up = F.interpolate(patch[:, None].double(), size=(56, 56), mode="bilinear", align_corners=False)[:, 0].numpy()
    for i in range(2):
        # bilinear (7 -> 56: scale 1/8, exact weights) on non-negative values: 4 products of 2 weights,
        # summed, <= 6 roundings; then the blur's 2(33 + 1); pointwise relative, float64's ~0
        np.testing.assert_allclose(ours[i], ndimage.gaussian_filter(up[i], sigma=4), rtol=(6 + 2 * (33 + 1) + 2) * U, atol=0)


def test_minmax_normalise_per_member_and_constant_member():
    x = torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]])
    out = minmax_normalise(x)
    assert out.tolist() == [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]
    maps = torch.rand(2, 3, 4, 4) * 100 + 7
    norm = minmax_normalise(maps)
    for m in range(2):
        expected = (maps[m] - maps[m].min()) / (maps[m].max() - maps[m].min())
        assert torch.equal(norm[m], expected)  # the same correctly rounded (x - lo) / span


def test_blur_builds_its_kernel_once_per_sigma_device_and_dtype(monkeypatch):
    """The kernel is built (and copied to the maps' device) once, not in every forward."""
    from patchcore_lightning import anomaly_map

    built = []
    kernel1d = anomaly_map.gaussian_kernel1d
    monkeypatch.setattr(anomaly_map, "gaussian_kernel1d", lambda *a, **k: built.append(a) or kernel1d(*a, **k))
    anomaly_map._device_kernel.cache_clear()
    maps = torch.rand(2, 40, 30, generator=torch.Generator().manual_seed(0))
    first = gaussian_blur(maps, 3.25)
    for _ in range(3):
        assert torch.equal(gaussian_blur(maps, 3.25), first)  # the same kernel: the same bits
    gaussian_blur(maps.double(), 3.25)
    gaussian_blur(maps, 2.0)
    assert built == [(3.25, 4.0), (3.25, 4.0), (2.0, 4.0)]  # float32 and float64 at 3.25, float32 at 2.0
    anomaly_map._device_kernel.cache_clear()  # the monkeypatched builder's kernels leave with it
