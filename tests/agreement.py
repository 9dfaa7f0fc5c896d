"""How far two float32 evaluations of one model (a GPU and a CPU, two CPU kernel settings) may be
apart in their metrics, bounded from the run's own data.

No figure fixed in advance bounds that: an AUROC reorders any (anomalous, normal) pair whose scores
tie within the rounding, and how many pairs do depends on the data. So each side measures how far
its float32 patch features lie from a float64 forward of the same network on the same images (the
exact features, to ~1e-16), and ``bounds.metric_shift_bounds`` turns the larger of the two relative
errors into the most each metric can move: the scores and maps move by at most
``score_shift_bound`` (the search computes its distances exactly, so the features are the only
source), the min-max normalisation and the ensemble mean carry that over, and the metrics move by
the fraction of pairs (AUROC) and the FPR window (AUPRO) that such a move can reorder. Used by
tests/test_agreement.py (two CPU kernel settings) and benchmarks/bench_gpu.py (a GPU and the CPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from patchcore_lightning.data.mvtec import MVTecDataset, list_samples
from patchcore_lightning.embedding import embed
from patchcore_lightning.metrics import METRIC_NAMES, evaluate
from patchcore_lightning.model import PatchCore

from .bounds import metric_shift_bounds


@dataclass
class DeviceRun:
    """One evaluation's raw outputs, on the CPU in float64, and the float32 features' rounding.

    Attributes:
        scores: (N, M) the members' raw image scores.
        maps: (N, M, H, W) the members' raw segmentations.
        rounding: the largest |f - f_exact| / |f_exact| over every patch feature f of every member.
    """

    scores: np.ndarray
    maps: np.ndarray
    rounding: float

    def save(self, path) -> None:
        np.savez(path, scores=self.scores, maps=self.maps, rounding=self.rounding)

    @classmethod
    def load(cls, path) -> DeviceRun:
        data = np.load(path)
        return cls(data["scores"], data["maps"], float(data["rounding"]))


def category_tensors(root, category: str, resize: int, imagesize: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """An MVTec-format category's test images (N, 3, S, S) as ``test`` prepares them, labels (N,)
    (1 anomalous) and masks (N, S, S) uint8 (255 anomalous)."""
    dataset = MVTecDataset(list_samples(root, category), resize, imagesize)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item[0] for item in items])
    masks = torch.stack([item[1] for item in items]).numpy()
    labels = np.array([int(s.anomaly != "good") for s in dataset.samples])
    return images, labels, masks


def exact_patch_features(model: PatchCore, images: torch.Tensor, member: int, device: torch.device) -> torch.Tensor:
    """The member's patch features (B*h*w, D) of ``images`` by the same network in float64 on ``device``."""
    p = model.params[member]
    # eval(): torch.fx rebuilds a copied GraphModule in train mode (PatchCore.__deepcopy__)
    extractor = copy.deepcopy(model.extractors[member]).eval().to(device, torch.float64)
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
    scores, maps, rounding = [], [], 0.0
    with torch.no_grad():
        for batch in images.split(batch_size):
            outputs = []
            for m in range(len(model)):
                feats, grid = model.patch_features(batch.to(device), m)  # (B*h*w, D) float32
                exact = exact_patch_features(model, batch, m, exact_device).to(device)  # (B*h*w, D) float64
                error = (feats.double() - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-300)
                rounding = max(rounding, float(error.max()))
                outputs.append(model.score_features(feats, grid, m, batch.shape[-2:]))
            scores.append(torch.stack([s for s, _ in outputs], dim=1).double().cpu())  # (B, M)
            maps.append(torch.stack([mp for _, mp in outputs], dim=1).double().cpu())  # (B, M, H, W)
    return DeviceRun(torch.cat(scores).numpy(), torch.cat(maps).numpy(), rounding)


def metrics_of(run: DeviceRun, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The five metrics of a run's raw outputs (``metrics.evaluate``, as ``test`` computes them)."""
    result = evaluate(
        torch.from_numpy(run.scores).float(), torch.from_numpy(run.maps).float(),
        torch.from_numpy(np.asarray(labels)).long(), torch.from_numpy(np.asarray(masks)),
    )
    return {name: getattr(result, name) for name in METRIC_NAMES}


def agreement_bounds(
    a: DeviceRun, b: DeviceRun, model: PatchCore, labels: np.ndarray, masks: np.ndarray
) -> dict[str, float]:
    """The most each of the five metrics of ``a`` and ``b`` can differ: ``bounds.metric_shift_bounds``
    from ``a``'s raw outputs, at the larger of the two runs' measured feature roundings. ``masks``
    (N, H, W) uint8, 255 anomalous; ``labels`` (N,)."""
    members = [(a.scores[:, m], a.maps[:, m]) for m in range(a.scores.shape[1])]
    bank_norms = [float(bank.vectors.double().norm(dim=1).max()) for bank in model.banks]
    masks = np.asarray(masks)
    subset = masks.reshape(len(masks), -1).max(axis=1) > 0  # the images of the anomaly-only metrics, as evaluate's
    return metric_shift_bounds(members, bank_norms, masks == 255, np.asarray(labels), subset,
                               rounding=max(a.rounding, b.rounding))
