"""Per-region overlap (PRO) and the area under the PRO curve, as MVTec AD defines them.

The ground truth of every image is split into 8-connected regions. At a threshold ``t`` on
the anomaly maps,

- ``fpr(t)`` is the fraction of all normal pixels (mask 0, over all images) with score >= t;
- ``pro(t)`` is the mean over all regions (of all images) of the fraction of the region's
  pixels with score >= t, so a small defect weighs as much as a large one.

Sweeping ``t`` down over every distinct score gives the PRO curve, which starts at (0, 0) and
ends at (1, 1). AUPRO is its area for ``fpr <= fpr_limit`` (trapezoid rule, the point at
``fpr_limit`` interpolated linearly), divided by ``fpr_limit`` so that a perfect detector
scores 1. This is exactly ``compute_pro`` + ``trapezoid`` of MVTec's official
``mvtec_ad_evaluation`` code: every distinct score is a threshold (no binning), equal scores
collapse into one curve point, and curve values are clipped to <= 1.

The curve is read off ranks (``ranking``): one sort of the keys of all pixels, then for each
anomalous pixel the number of pixels scoring below it and at most it. Between two scores of
anomalous pixels pro is constant, so those stretches are integrated as one trapezoid each.

All functions are pure tensor functions that stay on the input's device.
"""

import numbers

import torch

from .ranking import RankedPositives, order_keys, run_length

__all__ = ["aupro", "aupro_from_counts", "label_components", "region_weights"]

# The four "forward" 8-neighbour offsets (dy, dx); the other four are their mirror images,
# so one edge per neighbouring pair is enough.
_FORWARD_OFFSETS = ((0, 1), (1, -1), (1, 0), (1, 1))


def _neighbour_pairs(fg: torch.Tensor, fg_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges between 8-adjacent foreground pixels of the same image.

    Args:
        fg: (N, H, W) bool foreground.
        fg_index: (N, H, W) int32 or int64, the pixel's rank among foreground pixels (raster
            order over the whole batch); only read where ``fg`` is true.

    Returns:
        ``(u, v)``: (E,) int64 foreground ranks of the two ends of every edge.
    """
    _, H, W = fg.shape
    us, vs = [], []
    for dy, dx in _FORWARD_OFFSETS:
        # pixel (y, x) in window `a` is adjacent to pixel (y + dy, x + dx) in window `b`
        x0, x1 = max(0, -dx), W - max(0, dx)
        a = (slice(None), slice(0, H - dy), slice(x0, x1))
        b = (slice(None), slice(dy, H), slice(x0 + dx, x1 + dx))
        both = fg[a] & fg[b]  # (N, H - dy, W - |dx|)
        us.append(fg_index[a][both])
        vs.append(fg_index[b][both])
    return torch.cat(us).long(), torch.cat(vs).long()


def _foreground_components(fg: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Component of every foreground pixel of (N, H, W) bool ``fg``, in raster order over the batch.

    → ``(component, K)``: (F,) int64 in 1..K (see ``label_components`` for the numbering), K an int.
    """
    device = fg.device
    fg_flat = fg.reshape(-1)  # (N*H*W,)
    # int32 halves the memory traffic of this dense pass where the batch allows it
    index_dtype = torch.int32 if fg_flat.numel() < 2**31 else torch.int64
    fg_index = torch.cumsum(fg_flat, 0, dtype=index_dtype) - 1  # (N*H*W,) rank among fg pixels
    F = int(fg_index[-1]) + 1 if fg_flat.numel() else 0
    u, v = _neighbour_pairs(fg, fg_index.view(fg.shape))  # (E,), (E,) int64
    del fg_index

    # parent[p] >= p and lies in p's component; roots are the fixed points parent[r] == r.
    parent = torch.arange(F, device=device)  # (F,)
    while u.numel():
        pu, pv = parent[u], parent[v]  # (E,) roots of both ends (parent is compressed)
        parent.scatter_reduce_(0, torch.minimum(pu, pv), torch.maximum(pu, pv), reduce="amax")
        while True:  # pointer jumping until every pixel points at a root
            grandparent = parent[parent]  # (F,)
            if torch.equal(grandparent, parent):
                break
            parent = grandparent
        # two pixels with the same root keep sharing one, so their edge is settled for good
        unsettled = parent[u] != parent[v]  # (E,)
        u, v = u[unsettled], v[unsettled]

    is_root = parent == torch.arange(F, device=device)  # (F,)
    component_of_root = torch.cumsum(is_root, 0)  # (F,) 1..K at the roots
    return component_of_root[parent], int(is_root.sum())


def label_components(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-connected component labelling of a batch of binary masks, in torch.

    Equivalent to ``scipy.ndimage.label(mask, structure=np.ones((3, 3)))`` on every image
    (pixels touching only diagonally are connected), with the numbering running on across the
    batch. Components are found by hook-and-compress on the graph of adjacent foreground
    pixels: every pixel starts as its own root; each round every edge whose ends have
    different roots hooks the smaller root onto the larger one, then pointer jumping points
    every pixel straight at its root, and edges whose ends agree are dropped. The result is
    exact for any shape (the loop stops only when no edge joins two labels). After one dense
    pass that lists the edges, the rounds touch foreground pixels only, and there are few of
    them (a handful for blobs, random noise or a one-pixel-wide spiral).

    Args:
        masks: (N, H, W) masks, bool or numeric; every non-zero pixel is foreground.

    Returns:
        ``(labels, num_components)``: ``labels`` (N, H, W) int64 with 0 for background and
        1..K for the K components of the whole batch (components of image i are numbered
        before those of image i + 1; within an image, in raster order of each component's
        last pixel); ``num_components`` is K as a 0-d int64 tensor on ``masks.device``.

    Raises:
        ValueError: if ``masks`` is not 3-D.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    fg = masks != 0  # (N, H, W)
    component, K = _foreground_components(fg)  # (F,)
    labels = torch.zeros(fg.shape, dtype=torch.int64, device=masks.device)  # (N, H, W)
    labels[fg] = component
    return labels, torch.tensor(K, device=masks.device)


def region_weights(fg: torch.Tensor, pixels_per_pass: int = 1 << 18) -> tuple[torch.Tensor, int]:
    """Each foreground pixel's share of the PRO: 1 / size of its 8-connected region.

    (N, H, W) bool → ``(weights, K)``: (F,) float64 in raster order over the batch, K regions.
    Regions never span two images, so the images are labelled about ``pixels_per_pass`` pixels at
    a time (at least one image): the dense labelling pass needs 4 bytes per pixel.
    """
    images_per_pass = max(1, pixels_per_pass // max(1, fg[0].numel())) if len(fg) else 1
    parts, K = [], 0
    for part in fg.split(images_per_pass):
        component, k = _foreground_components(part)  # (F',) 1..k
        sizes = torch.bincount(component, minlength=k + 1)  # (k + 1,)
        parts.append(1.0 / sizes.to(torch.float64)[component])
        K += k
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=fg.device), 0
    return torch.cat(parts), K


def _trapezoid(x: torch.Tensor, y: torch.Tensor, x_max: float) -> torch.Tensor:
    """Area under the polyline (x, y) for x <= x_max; MVTec's ``trapezoid(x, y, x_max)``.

    Args:
        x: (P,) float64, ascending (repeats allowed), x[0] <= x_max <= x[-1].
        y: (P,) float64.
        x_max: upper integration limit; if it is not one of the x, y there is interpolated
            linearly between its two neighbours and the partial trapezoid is added.

    Returns:
        0-d float64 tensor.
    """
    x_max_t = torch.tensor([x_max], dtype=x.dtype, device=x.device)
    end = int(torch.searchsorted(x, x_max_t, right=True))  # bisect.bisect_right: x[:end] <= x_max
    assert 0 < end <= x.numel(), "x_max must lie inside the range of x"
    correction = torch.zeros((), dtype=x.dtype, device=x.device)
    if x[end - 1] != x_max:  # x_max is not one of the x, so 0 < end < P
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_interp + y0) * (x_max - x0)
    x, y = x[:end], y[:end]  # (P',) x is sorted, so this is MVTec's x[x <= x_max]
    return torch.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def _validate(scores: torch.Tensor, masks: torch.Tensor, fpr_limit: float) -> None:
    """Raise ValueError naming the bad value if the inputs of ``aupro`` are unusable."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be (N, H, W), got shape {tuple(scores.shape)}")
    if masks.shape != scores.shape:
        raise ValueError(
            f"masks shape {tuple(masks.shape)} differs from scores shape {tuple(scores.shape)}"
        )
    if masks.device != scores.device:
        raise ValueError(f"masks are on {masks.device} but scores on {scores.device}")
    is_number = isinstance(fpr_limit, numbers.Real) and not isinstance(fpr_limit, bool)
    if not is_number or not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"scores contain {int(torch.isnan(scores).sum())} NaN values")
    not_binary = (masks != 0) & (masks != 1)  # (N, H, W)
    if bool(not_binary.any()):
        bad = masks[not_binary][0].item()
        raise ValueError(
            f"masks must be binary (0 or 1), found value {bad!r}; binarise soft masks first "
            "(the original PatchCore counts only pixels exactly equal to 1)"
        )


def aupro_from_counts(
    pos_less: torch.Tensor,
    pos_at_most: torch.Tensor,
    neg_less: torch.Tensor,
    neg_at_most: torch.Tensor,
    weights: torch.Tensor,
    num_normal: int,
    num_regions: int,
    fpr_limit: float,
) -> torch.Tensor:
    """AUPRO from the ranks of the anomalous pixels, sorted by ascending score (ties in any order).

    For each of the P anomalous pixels: how many anomalous (``pos_*``) and how many normal
    (``neg_*``) pixels score below it (``*_less``) and at most it (``*_at_most``), all (P,) int64,
    and its ``weights`` (P,) float64, 1 / size of its region. ``num_normal`` > 0 and
    ``num_regions`` > 0. Returns a 0-d float64 tensor.

    The curve only changes slope at scores that some anomalous pixel has: between two such scores
    pro stays put while fpr grows. So the curve is kept at two points per distinct anomalous score
    u, "just above u" and "at u", and the straight stretches between them are single trapezoids
    (equal to the sum of the original's thin ones, up to float rounding).
    """
    P = pos_less.numel()
    first = pos_less == torch.arange(P, device=pos_less.device)  # (P,) first pixel of each distinct score
    a_less, a_at_most = pos_less[first].flip(0), pos_at_most[first].flip(0)  # (E,) highest score first
    n_less, n_at_most = neg_less[first].flip(0), neg_at_most[first].flip(0)  # (E,)
    # detected share of the regions once the anomalous pixels of rank >= k are above threshold,
    # summed from the highest score down as MVTec's cumulative sum does: (P + 1,)
    reached = torch.cat([weights.flip(0).cumsum(0).flip(0), weights.new_zeros(1)]) / num_regions
    fpr_above = (num_normal - n_at_most).to(torch.float64) / num_normal  # (E,) threshold just above u
    fpr_at = (num_normal - n_less).to(torch.float64) / num_normal  # (E,) threshold u
    x = torch.stack([fpr_above, fpr_at], dim=1).reshape(-1)  # (2E,) ascending
    y = torch.stack([reached[a_at_most], reached[a_less]], dim=1).reshape(-1)  # (2E,)
    zero, one = x.new_zeros(1), x.new_ones(1)
    # from the lowest anomalous score on, the remaining normals only move fpr to 1; then MVTec's (1, 1)
    x = torch.cat([zero, x.clamp_(max=1.0), one, one])  # (2E + 3,)
    y = torch.cat([zero, y.clamp_(max=1.0), y[-1:], one])  # (2E + 3,)
    return _trapezoid(x, y, fpr_limit) / fpr_limit


@torch.no_grad()
def aupro(scores: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> torch.Tensor:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    MVTec AD's definition, computed exactly (every distinct score is a threshold); see the
    module docstring. Regions are the 8-connected components of each image's mask.

    Args:
        scores: (N, H, W) real anomaly maps; higher means more anomalous.
        masks: (N, H, W) binary ground truth (bool, or numbers that are all 0 or 1).
        fpr_limit: upper limit of the false-positive rate, in (0, 1].

    Returns:
        0-d float64 tensor on ``scores.device``.

    Raises:
        ValueError: if the shapes differ or are not 3-D, ``fpr_limit`` is not in (0, 1],
            the scores contain NaN, the masks are not binary, or the masks have no normal
            pixel or no anomalous region (the curve is undefined then; for a batch of good
            images only, PRO has no meaning and the caller has to skip the metric).
    """
    _validate(scores, masks, fpr_limit)
    fg = masks != 0  # (N, H, W)
    weights, num_regions = region_weights(fg)  # (P,) in raster order
    num_normal = fg.numel() - weights.numel()
    if num_normal == 0:
        raise ValueError(f"masks have no normal pixel (all {fg.numel()} pixels are 1)")
    if num_regions == 0:
        raise ValueError(f"masks have no anomalous region (all {fg.numel()} pixels are 0)")
    ranked = RankedPositives.of(order_keys(scores[fg]))  # (P,) anomalous pixels
    runs = scores.reshape(-1).split(run_length(scores.device, ranked.keys.numel()))
    neg_less, neg_at_most = ranked.negatives_below(runs)  # (P,)
    return aupro_from_counts(
        ranked.less, ranked.at_most, neg_less, neg_at_most, weights[ranked.order], num_normal, num_regions,
        float(fpr_limit),
    )
