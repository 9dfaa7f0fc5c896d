"""What a run writes, as Lightning callbacks: progress per category, segmentation images, TensorBoard
images and curves, predictions, model folders. The model and the metric never write files.

Every image drawn is the one the backbone saw, taken from the batch (``data.images.to_display``):
no file is decoded twice.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
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
    "heatmap_names",
]

log = logging.getLogger("patchcore_lightning")


def _category(trainer: L.Trainer) -> tuple[str, int, int]:
    """The data module's current dataset name, its position (0-based) and the number of categories."""
    dm = trainer.datamodule
    return dm.dataset_name, dm.categories.index(dm.category), len(dm.categories)


def _scored_images(batch: tuple[torch.Tensor, ...], outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The images (b, 3, S, S) of the items ``test_step`` scored (``outputs["indices"]``, placeholders
    left out): the whole batch but for a DDP rank's placeholder batch, told apart without a sync."""
    images, indices = batch[0], batch[3]
    if len(outputs["indices"]) == len(indices):
        return images
    return images[indices != PADDING_INDEX]


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

    The maps are normalised over the whole category, so the images of a category are kept until it
    ends: converted to uint8 on the device (3 bytes a pixel) as batches come, taken to the host once
    at the end, with the PNGs; under DDP every process writes the images it scored.
    """

    def __init__(self, results_dir: str | Path) -> None:
        self.results_dir = Path(results_dir)
        self._images: list[tuple[torch.Tensor, torch.Tensor]] = []  # (indices (b,), images (b, S, S, 3) uint8), on the device

    @staticmethod
    def _enabled(pl_module: L.LightningModule) -> bool:
        return bool(pl_module.hparams.get("save_segmentation_images"))

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._images = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._enabled(pl_module) and len(outputs["indices"]):
            self._images.append((outputs["indices"], to_display(_scored_images(batch, outputs))))

    def on_evaluation(self, trainer, pl_module, result: Evaluation) -> None:
        if not self._enabled(pl_module):
            return
        samples = trainer.datamodule.test_dataset.samples
        folder = self.results_dir / "segmentation_images" / trainer.datamodule.dataset_name
        folder.mkdir(parents=True, exist_ok=True)
        images = {}
        for indices, pixels in self._images:
            images.update(zip(indices.tolist(), pixels.cpu().numpy()))
        self._images = []
        rows = torch.searchsorted(result.indices.cpu(), torch.tensor(sorted(images))).tolist()
        for index, row in zip(sorted(images), rows):
            sample, score = samples[index], float(result.scores[row])
            caption = f"{sample.anomaly}/{sample.image.name}" + ("" if math.isnan(score) else f"  score {score:.4f}")
            strip = overlay_strip(images[index], result.masks[row].cpu().numpy(), result.maps[row], caption)
            strip.save(folder / f"{sample.name}.png")
        if trainer.is_global_zero:
            log.info("segmentation images written to %s", folder)


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


def _candidates_by_label(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``hardest_candidates`` of the normal (highest) and the anomalous (lowest) images at once,
    without leaving the device: raw scores (N, M), labels (N,) → (N,) bool."""
    s = torch.where(labels[:, None] == 1, -scores, scores)  # (N, M): higher is harder, for either kind
    same = labels[None, :] == labels[:, None]  # (N, N)
    at_least = (s[None, :, :] >= s[:, None, :]).all(dim=2)  # (N, N): [i, j] = j matches or beats i everywhere
    beats = (s[None, :, :] > s[:, None, :]).any(dim=2)  # (N, N): [i, j] = j beats i somewhere
    return (same & at_least & beats).sum(dim=1) < k


class TensorBoardReport(EvaluationReceiver):
    """Per category, in the run's TensorBoard (rank 0): images ``<dataset>/hardest_cases`` (the
    ``per_kind`` highest-scored normal and lowest-scored anomalous images: image | ground truth |
    heatmap, with the normalised score) and ``<dataset>/roc`` (image and pixel ROC curves), and the
    pixel-level PR curve ``<dataset>/pixel_pr``. The metrics themselves are logged by the module.

    Only the images that can still be among the hardest are kept while the category runs (a
    few, whatever the size of the test set): picked on the device from the raw scores, converted
    to uint8 there, and taken to the host when the category ends; nothing else leaves the device
    per batch (one wait for the candidates' count). The curves are drawn from counts at 1001 score
    thresholds, in constant memory.
    """

    def __init__(self, per_kind: int = 4) -> None:
        self.per_kind = per_kind
        # the candidates so far, on the scores' device: raw scores (K, M), labels (K,), dataset
        # indices (K,) and the images as the backbone saw them (K, S, S, 3) uint8
        self._held: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _writer(trainer: L.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger
        return None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._held = None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """The candidates among the held images and the batch's, picked on the device from the raw
        scores; only the batch's images that are candidates are converted (uint8, on the device)."""
        if self._writer(trainer) is None or not len(outputs["indices"]):
            return
        raw, labels, indices = outputs["raw_scores"].detach(), outputs["labels"], outputs["indices"]  # (b, M), (b,), (b,)
        images = _scored_images(batch, outputs)  # (b, 3, S, S)
        if self._held is not None:
            raw, labels, indices = (torch.cat([old, new]) for old, new in zip(self._held[:3], (raw, labels, indices)))
        keep = _candidates_by_label(raw, labels, self.per_kind)  # (K + b,) bool
        held = 0 if self._held is None else len(self._held[0])
        new_images = to_display(images[keep[held:]])  # (b', S, S, 3): the batch's candidates only
        kept = new_images if self._held is None else torch.cat([self._held[3][keep[:held]], new_images])
        self._held = (raw[keep], labels[keep], indices[keep], kept)

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
        mine = {} if self._held is None else dict(zip(self._held[2].tolist(), self._held[3].cpu().numpy()))
        self._held = None
        held = {}
        for part in _gather_objects({i: mine[i] for i in wanted if i in mine}):
            held.update(part)
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


def heatmap_names(paths: Sequence[str], masks: bool = False, raw_maps: bool = False) -> list[str]:
    """Where ``predict`` draws each input (relative paths, ``/``-separated): its path under
    ``heatmaps/`` without ``.png``. That is the input's path without its extension (``day1/000.png`` →
    ``day1/000``), or with it where inputs of one folder differ only in their extension (``a.png`` and
    ``a.jpg`` → ``a.png`` and ``a.jpg``). Names are compared ignoring case, as a case-insensitive file
    system would. Raises ValueError, naming both inputs, when two would still write one file: their
    heatmap ``<name>.png``, binary mask ``<name>_mask.png`` (``masks``) or raw map ``<name>.npy`` (``raw_maps``).
    """
    stems = [str(PurePosixPath(p).with_suffix("")) for p in paths]
    shared = Counter(stem.casefold() for stem in stems)
    names = [path if shared[stem.casefold()] > 1 else stem for path, stem in zip(paths, stems)]
    suffixes = [".png", *(["_mask.png"] if masks else []), *([".npy"] if raw_maps else [])]
    owners: dict[str, str] = {}
    for path, name in zip(paths, names):
        for suffix in suffixes:
            other = owners.setdefault((name + suffix).casefold(), path)
            if other != path:
                raise ValueError(
                    f"predict would write heatmaps/{name}{suffix} for both {other} and {path} under data.predict_dir; "
                    f"rename one of them"
                )
    return names


class PredictionWriter(BasePredictionWriter):
    """``predict``'s outputs under ``results_dir``: ``heatmaps/<name>.png`` per image (``heatmap_names``;
    with the model's ``pixel_threshold`` also ``<name>_mask.png``, with ``save_raw_maps`` ``<name>.npy``)
    as batches come, ``predictions.csv`` and ``skipped.csv`` at the end (rank 0, every process's rows).

    A batch's outputs leave the device once (the images as uint8, converted there); the heatmaps are
    drawn and encoded by ``encode_threads`` threads (0: in the loop's thread) while the device scores
    the next batches. Every file is the same whatever the number of threads.
    """

    def __init__(self, results_dir: str | Path, encode_threads: int = 4) -> None:
        super().__init__(write_interval="batch")
        if encode_threads < 0:
            raise ValueError(f"encode_threads must be >= 0, got {encode_threads}")
        self.results_dir = Path(results_dir)
        self.encode_threads = encode_threads
        self.rows: list[dict] = []
        self._names: list[str] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []
        dataset = trainer.datamodule.predict_dataset
        paths = [dataset.relative(i) for i in range(len(dataset))]
        self._names = heatmap_names(paths, pl_module.pixel_threshold is not None, pl_module.hparams.save_raw_maps)
        if self.encode_threads:
            self._pool = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="patchcore-heatmaps")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        images, _, errors = batch
        indices, rows = prediction["indices"], prediction["rows"]
        dataset = trainer.datamodule.predict_dataset
        for index, error in zip(indices, errors):
            if error:
                self.rows.append({"path": dataset.relative(index), "error": error})
        if not rows:
            return
        # one transfer per output and batch; uint8 images converted on the device (a quarter of the bytes)
        shown = to_display(images[rows]).cpu().numpy()  # (b, S, S, 3)
        raw_maps, score, raw_scores = (prediction[k].cpu() for k in ("raw_maps", "score", "raw_scores"))  # (b, H, W), (b,), (b, M)
        pixels = None if prediction["anomalous_pixels"] is None else prediction["anomalous_pixels"].cpu()  # (b,)
        h = pl_module.hparams
        settings = (h.heatmap_max, pl_module.image_threshold, pl_module.pixel_threshold, h.save_raw_maps)
        for k, i in enumerate(rows):
            path = dataset.relative(indices[i])
            row = {"path": path, "score": float(score[k]), "scores": raw_scores[k].tolist()}
            if pixels is not None:
                row["anomalous_pixels"] = int(pixels[k])
            self.rows.append(row)
            self._submit(self.results_dir / "heatmaps" / self._names[indices[i]], path, row["score"], shown[k],
                         raw_maps[k], *settings)

    def _submit(self, *args) -> None:
        """Draws a heatmap in the pool (at most 16 per thread waiting: bounded memory), or right here."""
        if self._pool is None:
            _draw_heatmap(*args)
            return
        self._pending.append(self._pool.submit(_draw_heatmap, *args))
        while len(self._pending) > 16 * self.encode_threads or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()  # a failed heatmap fails the run

    def _close(self, wait: bool = True) -> None:
        """Waits for the heatmaps under way (raising the first error), then stops the threads."""
        try:
            while wait and self._pending:
                self._pending.popleft().result()
        finally:
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close(wait=False)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._close()
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


def _draw_heatmap(
    target: Path,
    path: str,
    score: float,
    image: np.ndarray,
    raw_map: torch.Tensor,
    heatmap_max: float | None,
    image_threshold: float | None,
    pixel_threshold: float | None,
    save_raw_map: bool,
) -> None:
    """``<target>.png``: the image (S, S, 3) | the raw map (H, W) over it on the fixed scale [0, top],
    captioned with the input's path and ``score``; ``<target>_mask.png`` (255 where the raw map is
    at or above ``pixel_threshold``) and ``<target>.npy`` (the raw map) when asked for."""
    top = heatmap_max or image_threshold or float(raw_map.max()) or 1.0
    target.parent.mkdir(parents=True, exist_ok=True)
    caption = f"{path}  score {score:.6g}  scale 0..{top:.4g}"  # the score of predictions.csv
    compose([image, blend(image, (raw_map / top).clamp(0, 1))], caption).save(target.with_name(target.name + ".png"))
    if save_raw_map:
        np.save(target.with_name(target.name + ".npy"), raw_map.numpy())
    if pixel_threshold is not None:
        mask = ((raw_map >= pixel_threshold).to(torch.uint8) * 255).numpy()
        Image.fromarray(mask).save(target.with_name(target.name + "_mask.png"))


class ModelFolderWriter(Callback):
    """At the end of ``fit``, the model in the original's format: ``<results_dir>/models/<dataset>/``
    (rank 0, while the other ranks wait), with our sidecar ``patchcore_lightning.json`` (weights' sha256,
    sampler, training images)."""

    def __init__(self, results_dir: str | Path) -> None:
        self.results_dir = Path(results_dir)

    def folder(self, dataset_name: str) -> Path:
        return self.results_dir / "models" / dataset_name

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module)
        # Every rank leaves fit only once the folder is on disk: ``test`` without model paths reads
        # it next, on every rank, and a rank that ran ahead would find no folder.
        trainer.strategy.barrier("model folder written")

    def _write(self, trainer, pl_module) -> None:
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
