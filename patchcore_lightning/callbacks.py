"""What a run writes, as Lightning callbacks: progress per category, segmentation images, TensorBoard
images and curves, predictions, model folders. The model and the metric never write files.

Every image drawn is the one the backbone saw, taken from the batch (``data.images.to_display``):
no file is decoded twice.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torchmetrics.functional.classification import binary_roc

from .data.images import PADDING_INDEX, to_display
from .metrics import Evaluation, curve_counts
from .module import EvaluationReceiver
from .reporting import blend, compose, overlay_strip, review_grid, roc_image, write_predictions

__all__ = [
    "CategoryProgressBar",
    "ModelFolderWriter",
    "PredictionWriter",
    "SegmentationImages",
    "TensorBoardReport",
    "hardest_candidates",
]

log = logging.getLogger("patchcore_lightning")


def _category(trainer: L.Trainer) -> tuple[str, int, int]:
    """The data module's current dataset name, its position (0-based) and the number of categories."""
    dm = trainer.datamodule
    return dm.dataset_name, dm.categories.index(dm.category), len(dm.categories)


def _valid(batch_images: torch.Tensor, indices: torch.Tensor) -> dict[int, np.ndarray]:
    """{dataset index: the image as the backbone saw it (S, S, 3) uint8} of a batch's real items."""
    keep = indices != PADDING_INDEX
    pixels = to_display(batch_images[keep].cpu()).numpy()  # (b, S, S, 3)
    return dict(zip(indices[keep].tolist(), pixels))


def _gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CategoryProgressBar(TQDMProgressBar):
    """Lightning's progress bar, named after the category: ``mvtec_bottle (1/15)``."""

    @staticmethod
    def _title(trainer: L.Trainer) -> str:
        name, position, total = _category(trainer)
        return f"{name} ({position + 1}/{total})"

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"fit {self._title(trainer)}")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0:
            self.test_progress_bar.set_description(self._title(trainer))


class SegmentationImages(EvaluationReceiver):
    """``<results_dir>/segmentation_images/<dataset>/<anomaly>_<stem>.png`` per test image, when the
    model's ``save_segmentation_images`` is set: the image | its ground truth | the heatmap (the
    normalised ensemble segmentation) over the image, captioned with the normalised image score.

    The maps are normalised over the whole category, so the images of a category are kept (uint8,
    3 bytes a pixel) until it ends; under DDP every process writes the images it scored.
    """

    def __init__(self, results_dir: str | Path) -> None:
        self.results_dir = Path(results_dir)
        self._images: dict[int, np.ndarray] = {}

    @staticmethod
    def _enabled(pl_module: L.LightningModule) -> bool:
        return bool(pl_module.hparams.get("save_segmentation_images"))

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._images = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._enabled(pl_module):
            self._images.update(_valid(batch[0], batch[3]))

    def on_evaluation(self, trainer, pl_module, result: Evaluation) -> None:
        if not self._enabled(pl_module):
            return
        samples = trainer.datamodule.test_dataset.samples
        folder = self.results_dir / "segmentation_images" / trainer.datamodule.dataset_name
        folder.mkdir(parents=True, exist_ok=True)
        rows = torch.searchsorted(result.indices.cpu(), torch.tensor(sorted(self._images))).tolist()
        for index, row in zip(sorted(self._images), rows):
            sample, score = samples[index], float(result.scores[row])
            caption = f"{sample.anomaly}/{sample.image.name}" + ("" if math.isnan(score) else f"  score {score:.4f}")
            strip = overlay_strip(self._images[index], result.masks[row].cpu().numpy(), result.maps[row], caption)
            strip.save(folder / f"{sample.name}.png")
        if trainer.is_global_zero:
            log.info("segmentation images written to %s", folder)
        self._images = {}


def hardest_candidates(scores: torch.Tensor, k: int, lowest: bool = False) -> torch.Tensor:
    """Which of N images (raw member scores (N, M)) can still be among the k highest (or lowest)
    ensemble scores, whatever the final normalisation: the ones fewer than k others dominate.

    The normalised ensemble score is a positive weighted sum of the members' raw scores (weights
    1 / span), so an image that k others match or beat in every member, and beat in one, can no
    longer be in the top k. → (N,) bool
    """
    s = -scores if lowest else scores  # (N, M): higher is harder
    at_least = (s[None, :, :] >= s[:, None, :]).all(dim=2)  # (N, N): [i, j] = j matches or beats i everywhere
    beats = (s[None, :, :] > s[:, None, :]).any(dim=2)  # (N, N): [i, j] = j beats i somewhere
    return (at_least & beats).sum(dim=1) < k


class TensorBoardReport(EvaluationReceiver):
    """Per category, in the run's TensorBoard (rank 0): images ``<dataset>/hardest_cases`` (the
    ``per_kind`` highest-scored normal and lowest-scored anomalous images: image | ground truth |
    heatmap, with the normalised score) and ``<dataset>/roc`` (image and pixel ROC curves), and the
    pixel-level PR curve ``<dataset>/pixel_pr``. The metrics themselves are logged by the module.

    Only the images that can still be among the hardest are kept while the category runs (a
    few, whatever the size of the test set); the curves are drawn from counts at 1001 score
    thresholds, in constant memory.
    """

    def __init__(self, per_kind: int = 4) -> None:
        self.per_kind = per_kind
        self._images: dict[int, np.ndarray] = {}
        self._scores: dict[int, tuple[torch.Tensor, int]] = {}  # index → (raw scores (M,), label)

    @staticmethod
    def _writer(trainer: L.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger
        return None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._images, self._scores = {}, {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._writer(trainer) is None:
            return
        self._images.update(_valid(batch[0], batch[3]))
        raw = outputs["raw_scores"].detach().cpu()  # (b, M): test_step's, without placeholders
        for index, label, row in zip(outputs["indices"].tolist(), outputs["labels"].tolist(), raw):
            self._scores[index] = (row, label)
        for label in (0, 1):  # drop the images that can no longer be among the hardest of their kind
            kind = [i for i, (_, lab) in self._scores.items() if lab == label]
            if len(kind) > self.per_kind:
                keep = hardest_candidates(torch.stack([self._scores[i][0] for i in kind]), self.per_kind, label == 1)
                for i, kept in zip(kind, keep.tolist()):
                    if not kept:
                        del self._scores[i], self._images[i]

    def on_evaluation(self, trainer, pl_module, result: Evaluation) -> None:
        logger = self._writer(trainer)
        if logger is None:
            return
        name, step, _ = _category(trainer)
        scores, labels, indices = result.scores.cpu(), result.labels.cpu(), result.indices.cpu()
        normal, anomalous = (labels == 0).nonzero().flatten(), (labels == 1).nonzero().flatten()
        rows = [
            *normal[scores[normal].argsort(descending=True)[: self.per_kind]].tolist(),
            *anomalous[scores[anomalous].argsort()[: self.per_kind]].tolist(),
        ]
        wanted = [int(indices[r]) for r in rows]
        held = {}
        for part in _gather_objects({i: self._images[i] for i in wanted if i in self._images}):
            held.update(part)
        self._images, self._scores = {}, {}
        if not trainer.is_global_zero:
            return
        writer = logger.experiment
        samples = trainer.datamodule.test_dataset.samples
        strips = []
        for row, index in zip(rows, wanted):
            caption = f"{samples[index].anomaly}/{samples[index].image.name}  score {float(scores[row]):.4f}"
            strips.append(overlay_strip(held[index], result.masks[row].cpu().numpy(), result.maps[row], caption))
        if strips:
            writer.add_image(f"{name}/hardest_cases", review_grid(strips), step, dataformats="CHW")
        curves = {}
        if len(normal) and len(anomalous):
            fpr, tpr, _ = binary_roc(scores, labels)
            curves[f"image (AUROC {result.instance_auroc:.4f})"] = (fpr, tpr)
        gt = result.masks == 255
        tp, fp = curve_counts(result.maps, gt)  # (1001,) each, thresholds ascending
        P, Q = int(tp[0]), int(fp[0])
        if P and Q:
            curves[f"pixel (AUROC {result.full_pixel_auroc:.4f})"] = (fp.flip(0) / Q, tp.flip(0) / P)
            tp, fp = tp[::5].cpu(), fp[::5].cpu()  # 201 thresholds, as TensorBoard's PR curves
            precision = tp / (tp + fp).clamp_min(1)
            writer.add_pr_curve_raw(f"{name}/pixel_pr", tp, fp, Q - fp, P - tp, precision, tp / P, step, len(tp))
        if curves:
            writer.add_image(f"{name}/roc", roc_image({k: (x.cpu(), y.cpu()) for k, (x, y) in curves.items()}),
                             step, dataformats="CHW")


class PredictionWriter(BasePredictionWriter):
    """``predict``'s outputs under ``results_dir``: ``heatmaps/<path>.png`` (and ``.npy`` with the model's
    ``save_raw_maps``) as batches come, ``predictions.csv`` and ``skipped.csv`` at the end (rank 0,
    every process's rows)."""

    def __init__(self, results_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.results_dir = Path(results_dir)
        self.rows: list[dict] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        images, indices, errors = batch
        dataset = trainer.datamodule.predict_dataset
        for index, error in zip(indices.tolist(), errors):
            if error:
                self.rows.append({"path": dataset.relative(index), "error": error})
        shown = to_display(images[prediction["rows"]].cpu()).numpy() if prediction["rows"] else []
        for k, i in enumerate(prediction["rows"]):
            path = dataset.relative(int(indices[i]))
            raw_map = prediction["raw_maps"][k]  # (H, W)
            row = {"path": path, "score": float(prediction["score"][k]), "scores": prediction["raw_scores"][k].tolist()}
            if prediction["anomalous_pixels"] is not None:
                row["anomalous_pixels"] = int(prediction["anomalous_pixels"][k])
            self.rows.append(row)
            self._heatmap(pl_module, path, shown[k], raw_map)

    def _heatmap(self, pl_module, path: str, image: np.ndarray, raw_map: torch.Tensor) -> None:
        """``heatmaps/<path>.png``: the image | the raw map over it, on the fixed scale [0, heatmap_max]."""
        h = pl_module.hparams
        top = h.heatmap_max or pl_module.image_threshold or float(raw_map.max()) or 1.0
        target = self.results_dir / "heatmaps" / f"{path}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        caption = f"{path}  max {float(raw_map.max()):.4g}  scale 0..{top:.4g}"
        compose([image, blend(image, (raw_map / top).clamp(0, 1))], caption).save(target)
        if h.save_raw_maps:
            np.save(target.with_suffix(".npy"), raw_map.cpu().numpy())
        if pl_module.pixel_threshold is not None:  # the binary mask: 255 where the raw map is at or above it
            mask = ((raw_map >= pl_module.pixel_threshold).to(torch.uint8) * 255).cpu().numpy()
            Image.fromarray(mask).save(target.with_name(f"{Path(path).name}_mask.png"))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows = sorted((row for part in _gather_objects(self.rows) for row in part), key=lambda r: r["path"])
        self.rows = []
        if not trainer.is_global_zero:
            return
        scored = write_predictions(
            self.results_dir, rows, pl_module.image_threshold, pl_module.pixel_threshold, len(pl_module.model)
        )
        log.info("scored %d images -> %s, heatmaps in %s", scored, self.results_dir / "predictions.csv",
                 self.results_dir / "heatmaps")
        if len(rows) > scored:
            log.info("skipped %d unreadable files -> %s", len(rows) - scored, self.results_dir / "skipped.csv")


class ModelFolderWriter(Callback):
    """At the end of ``fit``, the model in the original's format: ``<results_dir>/models/<dataset>/``
    (rank 0), with our sidecar ``patchcore_lightning.json`` (weights' sha256, sampler, training images)."""

    def __init__(self, results_dir: str | Path) -> None:
        self.results_dir = Path(results_dir)

    def folder(self, dataset_name: str) -> Path:
        return self.results_dir / "models" / dataset_name

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        h, model = pl_module.hparams, pl_module.model
        sidecar = {
            "weights_sha256": {p.backbone: pl_module.backbone_cache.sha256.get(p.backbone) for p in model.params},
            "backbone_weights": h.backbone_weights,
            "original_bn_warmup": h.original_bn_warmup,
            "sampler": h.sampler,
            "percentage": h.percentage,
            "n_train_images": pl_module.n_train_images,
            "lightning": L.__version__,
        }
        folder = model.save(self.folder(trainer.datamodule.dataset_name), sidecar)
        log.info("model written to %s", folder)
