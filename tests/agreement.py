"""How far two float32 evaluations of one model (a GPU and a CPU, two CPU kernel settings) may be
apart in their metrics, bounded from the run's own data.

No figure fixed in advance bounds that: an AUROC reorders any (anomalous, normal) pair whose scores
tie within the rounding, and how many pairs do depends on the data. So each side measures how far
each of its float32 patch features lies from a float64 forward of the same network on the same
images (the exact features, to ~1e-16); the searches compute their distances exactly, so the
features are the only source: each patch score moves by what its feature's shift allows
(``patch_shifts``), each image's score by its largest patch's, each pixel by the upsampled,
blurred moves of its patches, and the metrics by the fraction of pairs (AUROC) and the area
between the PRO curves of the pixels moved down and up (AUPRO) that such moves allow
(``agreement_bounds``). It assumes, as ``MemoryBank.search`` states, that the k nearest rows are
among the k + 4 candidates the float32 formula picks. Used by tests/test_agreement.py (two CPU
kernel settings), benchmarks/bench_gpu.py and benchmarks/gpu_equivalence.py (a GPU and the CPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from patchcore_lightning.anomaly_map import segmentation_maps
from patchcore_lightning.data.mvtec import MVTecDataset, list_samples
from patchcore_lightning.embedding import embed
from patchcore_lightning.metrics import METRIC_NAMES, evaluate
from patchcore_lightning.model import PatchCore

from .bounds import U, chain_bound, ensemble_metric_bounds, patch_score_shift, raw_metric_bounds


@dataclass
class DeviceRun:
    """One evaluation's raw outputs, on the CPU in float64, and its float32 features' rounding.

    Attributes:
        scores: (N, M) the members' raw image scores.
        maps: (N, M, H, W) the members' raw segmentations.
        patches: (N, M, P) the members' patch scores (P = h*w).
        errors: (N, M, P) each patch feature's distance |f - f_exact| to the float64 forward's.
        rounding: the largest relative error |f - f_exact| / |f_exact| of any patch feature.
        grid: the patch grid (h, w), P = h * w (the members share it: one input size).
    """

    scores: np.ndarray
    maps: np.ndarray
    patches: np.ndarray
    errors: np.ndarray
    rounding: float
    grid: tuple[int, int]

    def save(self, path) -> None:
        np.savez(path, **{k: np.asarray(getattr(self, k)) for k in ("scores", "maps", "patches", "errors", "rounding", "grid")})

    @classmethod
    def load(cls, path) -> DeviceRun:
        data = np.load(path)
        return cls(data["scores"], data["maps"], data["patches"], data["errors"], float(data["rounding"]),
                   tuple(int(n) for n in data["grid"]))


def category_tensors(root, category: str, resize: int, imagesize: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """An MVTec-format category's test images (N, 3, S, S) as ``test`` prepares them, labels (N,)
    (1 anomalous) and masks (N, S, S) uint8 (255 anomalous)."""
    dataset = MVTecDataset(list_samples(root, category), resize, imagesize)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item[0] for item in items])
    masks = torch.stack([item[1] for item in items]).numpy()
    labels = np.array([int(s.anomaly != "good") for s in dataset.samples])
    return images, labels, masks


def exact_extractor(model: PatchCore, member: int, device: torch.device) -> torch.nn.Module:
    """The member's backbone in float64 on ``device`` (eval(): torch.fx rebuilds a copied GraphModule
    in train mode, see PatchCore.__deepcopy__)."""
    return copy.deepcopy(model.extractors[member]).eval().to(device, torch.float64)


def exact_patch_features(model: PatchCore, extractor: torch.nn.Module, images: torch.Tensor, member: int) -> torch.Tensor:
    """The member's patch features (B*h*w, D) of ``images`` through ``exact_extractor``'s float64 network."""
    p = model.params[member]
    device = next(extractor.parameters()).device
    layer_maps = extractor(images.to(device, torch.float64))  # {layer: (B, C, h_l, w_l)} float64
    layers = [layer_maps[layer] for layer in p.layers]
    return embed(layers, p.patchsize, p.patchstride, p.pretrain_embed_dimension, p.target_embed_dimension)[0]


def device_run(
    model: PatchCore, images: torch.Tensor, device: str | torch.device, batch_size: int = 8,
    exact_device: str | torch.device | None = None,
) -> DeviceRun:
    """``model``'s raw outputs of ``images`` (N, 3, S, S) computed on ``device`` in float32 (the path of
    ``PatchCore.forward``, from the very features whose rounding is measured), and that rounding,
    measured against float64 features computed on ``exact_device`` (default ``device``)."""
    device = torch.device(device)
    exact_device = device if exact_device is None else torch.device(exact_device)
    model = model.to(device).eval()
    extractors = [exact_extractor(model, m, exact_device) for m in range(len(model))]
    parts: dict[str, list[torch.Tensor]] = {"scores": [], "maps": [], "patches": [], "errors": []}
    rounding = 0.0
    with torch.no_grad():
        for batch in images.split(batch_size):
            scores, maps, patches, errors = [], [], [], []
            for m in range(len(model)):
                feats, grid = model.patch_features(batch.to(device), m)  # (B*h*w, D) float32
                exact = exact_patch_features(model, extractors[m], batch, m).to(device)  # (B*h*w, D) float64
                error = (feats.double() - exact).norm(dim=1)  # (B*h*w,)
                rounding = max(rounding, float((error / exact.norm(dim=1).clamp_min(1e-300)).max()))
                score, segmentation, patch = model.score_features(feats, grid, m, batch.shape[-2:])
                scores.append(score)  # (B,)
                maps.append(segmentation)  # (B, H, W)
                patches.append(patch.flatten(1))  # (B, h*w)
                errors.append(error.view(len(batch), -1))
            for name, values in zip(parts, (scores, maps, patches, errors)):
                parts[name].append(torch.stack(values, dim=1).double().cpu())  # (B, M, ...)
    return DeviceRun(*(torch.cat(parts[name]).numpy() for name in parts), rounding, tuple(grid))


def metrics_of(run: DeviceRun, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The five metrics of a run's raw outputs (``metrics.evaluate``, as ``test`` computes them)."""
    result = evaluate(
        torch.from_numpy(run.scores).float(), torch.from_numpy(run.maps).float(),
        torch.from_numpy(np.asarray(labels)).long(), torch.from_numpy(np.asarray(masks)),
    )
    return {name: getattr(result, name) for name in METRIC_NAMES}


def patch_shifts(a: DeviceRun, b: DeviceRun, model: PatchCore) -> np.ndarray:
    """How far each patch score of ``a`` and ``b`` can be apart, (N, M, P).

    Each side's feature lies within its measured error of the float64 feature, so the two within
    e = e_a + e_b of each other. The distance to the r-th nearest bank row is 1-Lipschitz in the
    feature, so each of the k nearest distances r moves by at most e and its square by e (2 r + e),
    with r <= sqrt(k s) for the mean s of the k squares (the patch score). Both searches compute
    the distances exactly and round each once, then average them in float32: (k + 2) u of the
    score per side."""
    k = np.array([p.anomaly_scorer_num_nn for p in model.params], dtype=np.float64)[None, :, None]  # (1, M, 1)
    return patch_score_shift(a.errors + b.errors, a.patches, k, 2 * (k + 2))  # (N, M, P)


def agreement_bounds(
    a: DeviceRun, b: DeviceRun, model: PatchCore, labels: np.ndarray, masks: np.ndarray
) -> dict[str, float]:
    """The most each of the five metrics of ``a`` and ``b`` can differ, from ``a``'s raw outputs and
    both runs' measured feature errors. ``masks`` (N, H, W) uint8, 255 anomalous; ``labels`` (N,).

    An image's score moves by at most its largest patch shift (``patch_shifts``); a pixel of its map
    by the same upsampling and blur of the patch shifts (non-negative weights: the map of the
    shifts bounds the shift of the map; float64 weights here, within u of the runs' float32 ones)
    plus both runs' rounding of the upsampling and the 33-tap blur. One member: the metrics rank the raw values
    (``bounds.raw_metric_bounds``). Several members: the normalisation
    turns each member's largest shift delta into 4 delta / (span - 2 delta) and the mean averages
    them (``bounds.ensemble_metric_bounds``)."""
    masks = np.asarray(masks)
    truth, labels = masks == 255, np.asarray(labels).astype(bool)
    subset = masks.reshape(len(masks), -1).max(axis=1) > 0  # the images of the anomaly-only metrics, as evaluate's
    shifts = patch_shifts(a, b, model)  # (N, M, P)
    image_shift = shifts.max(axis=2)  # (N, M)
    blur = chain_bound(2 * (33 + 1) + 6, a.maps.reshape(*a.maps.shape[:2], -1).max(axis=2))  # (N, M)
    map_shift = image_shift + blur  # (N, M)
    if a.scores.shape[1] > 1:
        members = [(a.scores[:, m], a.maps[:, m]) for m in range(a.scores.shape[1])]
        return ensemble_metric_bounds(members, image_shift.max(axis=0), map_shift.max(axis=0), truth, labels, subset)
    patch_grid = torch.from_numpy(shifts[:, 0].reshape(len(shifts), *a.grid))  # (N, h, w) float64
    pixel_shift = segmentation_maps(patch_grid, a.maps.shape[-2:]).numpy() * (1 + 4 * U)  # (N, H, W)
    return raw_metric_bounds(a.scores[:, 0], a.maps[:, 0], truth, labels, subset, image_shift[:, 0],
                             pixel_shift + blur[:, 0, None, None])
