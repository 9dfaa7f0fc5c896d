"""label_components against scipy.ndimage.label; aupro against a direct threshold loop."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from patchcore_lightning.pro import aupro, label_components, region_weights

from .bounds import aupro_bound

_EIGHT = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------- oracles and fixtures


def _scipy_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """(N, H, W) masks -> scipy's 8-connected labels, numbered on across the batch."""
    out = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for i, mask in enumerate(masks):
        labels, n = ndi.label(mask, structure=_EIGHT)
        out[i] = np.where(labels > 0, labels + total, 0)
        total += n
    return out, total


def _assert_same_partition(masks: np.ndarray) -> None:
    labels, k = label_components(torch.from_numpy(masks))
    ref, k_ref = _scipy_labels(masks)
    ours = labels.numpy()
    assert labels.dtype == torch.int64 and labels.shape == masks.shape
    assert int(k) == k_ref
    np.testing.assert_array_equal(ours == 0, ref == 0)
    # labels are exactly 1..K, and (ours, scipy) pairs form a bijection between label sets
    np.testing.assert_array_equal(np.unique(ours[ours > 0]), np.arange(1, k_ref + 1))
    pairs = np.unique(np.stack([ours[ours > 0], ref[ref > 0]]), axis=1)  # (2, K) if bijective
    assert pairs.shape[1] == k_ref


def _spiral(size: int) -> np.ndarray:
    """A one-pixel-wide square spiral: one component whose path runs through most pixels."""
    grid = np.zeros((size, size), dtype=bool)
    y, x, dy, dx = 0, 0, 0, 1
    for _ in range(size * size):
        grid[y, x] = True
        ny, nx = y + 2 * dy, x + 2 * dx
        if not (0 <= ny < size and 0 <= nx < size) or grid[ny, nx]:
            dy, dx = dx, -dy  # turn clockwise
            ny, nx = y + 2 * dy, x + 2 * dx
            if not (0 <= ny < size and 0 <= nx < size) or grid[ny, nx]:
                break
        y, x = y + dy, x + dx
    return grid


def _blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Smoothed-noise blobs: a few irregular regions per image, some images empty."""
    field = ndi.gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 1.5, 1.5))
    masks = field > 0.25
    masks[0] = False  # a good image
    return masks


def _oracle_aupro(scores: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Slow, direct AUPRO: one pass over the data for every distinct threshold."""
    regions = []
    for i, mask in enumerate(masks):
        labels, n = ndi.label(mask, structure=_EIGHT)
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = masks == 0
    xs, ys = [0.0], [0.0]
    for threshold in np.unique(scores)[::-1]:
        detected = scores >= threshold
        xs.append((detected & normal).sum() / normal.sum())
        ys.append(np.mean([detected[i][region].mean() for i, region in regions]))
    xs.append(1.0)
    ys.append(1.0)

    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:  # the segment crosses the limit: integrate up to the interpolated point
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
    return area / fpr_limit


def _random_case(seed: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 3, 16, 16)
    masks[1, 0, 0] = masks[1, 1, 1] = True  # a diagonal pair on the border: one region
    masks[1, 0, 1] = masks[1, 1, 0] = False
    scores = rng.random(masks.shape) + 0.6 * masks
    if decimals is not None:
        scores = np.round(scores, decimals)  # heavy ties, also across normal/anomalous
    return scores.astype(np.float32), masks


# ---------------------------------------------------------------- label_components


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("density", [0.1, 0.4, 0.6, 0.9])
def test_label_components_matches_scipy_on_random_masks(seed: int, density: float) -> None:
    rng = np.random.default_rng(seed)
    _assert_same_partition(rng.random((4, 23, 37)) < density)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_components_matches_scipy_on_blobs(seed: int) -> None:
    _assert_same_partition(_blob_masks(np.random.default_rng(seed), 5, 48, 40))


def test_label_components_special_shapes() -> None:
    spiral = _spiral(41)
    assert ndi.label(spiral, structure=_EIGHT)[1] == 1  # the fixture is what it claims
    diagonal = np.eye(41, dtype=bool) | np.eye(41, dtype=bool)[::-1]  # an X of diagonal touches
    checker = (np.indices((41, 41)).sum(0) % 2).astype(bool)  # one component, diagonals only
    border = np.zeros((41, 41), dtype=bool)
    border[0, :] = border[:, -1] = border[-1, 5:9] = border[20, 0] = True
    single = np.zeros((41, 41), dtype=bool)
    single[7, 3] = single[30, 30] = True
    masks = np.stack([spiral, diagonal, checker, border, single,
                      np.zeros((41, 41), bool), np.ones((41, 41), bool)])
    _assert_same_partition(masks)
    labels, k = label_components(torch.from_numpy(masks))
    assert int(k) == 1 + 1 + 1 + 3 + 2 + 0 + 1


def test_label_components_numeric_masks_and_edge_shapes() -> None:
    rng = np.random.default_rng(3)
    masks = rng.random((3, 1, 29)) < 0.5  # a single row
    _assert_same_partition(masks)
    _assert_same_partition(np.ascontiguousarray(masks.transpose(0, 2, 1)))  # a single column
    labels, k = label_components(torch.zeros(2, 5, 5, dtype=torch.uint8))
    assert int(k) == 0 and not labels.any()
    labels, k = label_components(torch.zeros(0, 4, 4, dtype=torch.bool))
    assert int(k) == 0 and labels.shape == (0, 4, 4)
    uint8 = torch.tensor([[[0, 3, 0], [0, 0, 0], [1, 0, 1]]], dtype=torch.uint8)
    labels, k = label_components(uint8)  # non-zero is foreground, whatever its value
    assert int(k) == 3 and (labels > 0).eq(uint8 > 0).all()


def test_label_components_rejects_non_3d() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        label_components(torch.zeros(4, 4, dtype=torch.bool))


# ---------------------------------------------------------------- aupro


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_direct_oracle(seed: int, decimals: int | None, fpr_limit: float) -> None:
    scores, masks = _random_case(seed, decimals)
    got = aupro(torch.from_numpy(scores), torch.from_numpy(masks), fpr_limit)
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(_oracle_aupro(scores, masks, fpr_limit), abs=aupro_bound(scores.size, fpr_limit))


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_fpr_limit_exactly_on_a_curve_point(seed: int) -> None:
    scores, masks = _random_case(seed, decimals=1)
    normal = masks == 0
    # the fpr of some mid threshold, computed as the curve computes it: count / normals
    threshold = np.unique(scores)[len(np.unique(scores)) // 2]
    fpr_limit = float((scores[normal] >= threshold).sum() / normal.sum())
    assert 0 < fpr_limit < 1
    got = aupro(torch.from_numpy(scores), torch.from_numpy(masks), fpr_limit)
    assert float(got) == pytest.approx(_oracle_aupro(scores, masks, fpr_limit), abs=aupro_bound(scores.size, fpr_limit))


def test_aupro_accepts_uint8_and_float_binary_masks() -> None:
    scores, masks = _random_case(4, decimals=None)
    expected = _oracle_aupro(scores, masks, 0.3)
    for dtype in (torch.uint8, torch.float32):
        got = aupro(torch.from_numpy(scores), torch.from_numpy(masks).to(dtype))
        assert float(got) == pytest.approx(expected, abs=aupro_bound(scores.size, 0.3))


def test_aupro_hand_computed_cases() -> None:
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # two pixels touching diagonally: one region
    masks[1, 3:7, 3:7] = True  # a second, larger region

    # perfect detector: pro = 1 at fpr = 0, so the area is the whole box
    bound = aupro_bound(masks.numel(), 0.3)  # the limits 1.0 below: tighter
    assert float(aupro(masks.float(), masks)) == pytest.approx(1.0, abs=bound)

    # constant map: a single threshold, the curve is the diagonal (0, 0) -> (1, 1)
    constant = torch.full(masks.shape, 0.5)
    assert float(aupro(constant, masks, 0.3)) == pytest.approx(0.15, abs=bound)
    assert float(aupro(constant, masks, 1.0)) == pytest.approx(0.5, abs=bound)

    # only the small region detected: pro jumps to 1/2 (the mean over regions, not 2/18 of
    # the pixels, and not 2/3 as with 4-connected regions) at fpr 0, then the line to (1, 1):
    # pro(0.3) = 0.5 + 0.5 * 0.3 = 0.65, area = (0.5 + 0.65) / 2 * 0.3, divided by 0.3
    small_only = torch.zeros(masks.shape, dtype=torch.float64)
    small_only[0, 1, 1] = small_only[0, 2, 2] = 1.0
    assert float(aupro(small_only, masks, 0.3)) == pytest.approx(0.575, abs=bound)


def test_aupro_is_exact_not_binned() -> None:
    # two normal pixels scoring a hair above the region: the region is reached only at
    # fpr = 2 / (N - 4); a binned curve would merge these thresholds
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, 4:6, 4:6] = True
    scores = torch.where(masks, 0.9, 0.0).double()
    scores[0, 0, 0] = scores[0, 9, 9] = 0.9 + 1e-12
    fpr_at_region = 2 / 96
    # curve: (0, 0) (2/96, 0) (2/96, 1) (1, 1) (1, 1); limit 0.3: box from 2/96 to 0.3
    expected = (0.3 - fpr_at_region) / 0.3
    assert float(aupro(scores, masks, 0.3)) == pytest.approx(expected, abs=aupro_bound(scores.numel(), 0.3))


@pytest.mark.parametrize(
    ("scores", "masks", "fpr_limit", "message"),
    [
        (torch.rand(2, 4, 4), torch.zeros(2, 4, 5), 0.3, r"\(2, 4, 5\).*\(2, 4, 4\)"),
        (torch.rand(4, 4), torch.zeros(4, 4), 0.3, r"\(4, 4\)"),
        (torch.rand(1, 4, 4), torch.eye(4)[None], 0.0, r"fpr_limit.*0\.0"),
        (torch.rand(1, 4, 4), torch.eye(4)[None], 1.5, r"fpr_limit.*1\.5"),
        (torch.rand(1, 4, 4), torch.eye(4)[None] * 0.5, 0.3, r"binary.*0\.5"),
        (torch.rand(1, 4, 4), torch.ones(1, 4, 4), 0.3, r"no normal pixel.*16"),
        (torch.rand(1, 4, 4), torch.zeros(1, 4, 4), 0.3, r"no anomalous region.*16"),
        (torch.full((1, 4, 4), float("nan")), torch.eye(4)[None], 0.3, r"16 NaN"),
    ],
)
def test_aupro_rejects_bad_input(
    scores: torch.Tensor, masks: torch.Tensor, fpr_limit: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        aupro(scores, masks, fpr_limit)


@pytest.mark.parametrize("pixels_per_pass", [1, 2 * 24 * 20 + 7, 1 << 30])
def test_region_weights_are_one_over_the_scipy_region_size_in_any_number_of_passes(pixels_per_pass) -> None:
    rng = np.random.default_rng(11)
    masks = _blob_masks(rng, 7, 24, 20)
    masks[3] = False  # an image without regions between others
    labels, num = _scipy_labels(masks)  # numbered on across the batch
    expected = 1.0 / np.bincount(labels.ravel())[labels[masks]]  # raster order
    weights, k = region_weights(torch.from_numpy(masks), pixels_per_pass)
    assert k == num and weights.dtype == torch.float64
    assert np.array_equal(weights.numpy(), expected)
    empty, k0 = region_weights(torch.zeros(0, 24, 20, dtype=torch.bool), pixels_per_pass)
    assert empty.numel() == 0 and k0 == 0
