"""PatchCoreModule: the PatchCore model in Lightning's loops.

- ``fit``: ``training_step`` collects every training image's patch features; at the end of the
  epoch each member's features are subsampled (the coreset) into its memory bank by
  ``model.build_bank``, the function ``PatchCore.fit`` uses, with the seed the module is given.
- ``test``: ``test_step`` runs the model and feeds the category's metric; at the end of the epoch
  the metric is computed (gathered from every process under DDP) and its ``Evaluation`` handed to
  the Trainer's ``EvaluationReceiver`` callbacks (the writers, the CLI's results).
- ``predict``: ``predict_step`` returns each image's raw scores and segmentation.

Files are written by the callbacks (``callbacks.py``), never here. Global state (TF32 flags,
warning filters, the seed) is the CLI's: the module reads ``allow_tf32`` and ``seed``, it sets nothing.
"""

from __future__ import annotations

import logging
import math
import os

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry

from .backbones import BackboneWeights
from .coreset import SamplerName
from .data.images import PADDING_INDEX
from .memory_bank import KnnBackend
from .metrics import Evaluation, PatchCoreEvaluation
from .model import Backbones, PatchCore, build_bank, concat_freeing, member_params
from .model_io import PatchCoreParams
from .reporting import read_thresholds

__all__ = ["EvaluationReceiver", "FrozenModelDDPStrategy", "PatchCoreModule", "frozen_model_strategy", "leave_model_unwrapped"]

log = logging.getLogger(__name__)


class PatchCoreModule(L.LightningModule):
    """PatchCore: evaluate model folders in the original's format, build them (``fit``), score images.

    Args:
        model_paths: one model folder per category of ``data.categories``, or exactly one folder
            used for every category. A folder holds ``patchcore_params.pkl`` and
            ``nnscorer_search_index.faiss``, or ``Ensemble-<i>-<n>_`` prefixed files of n members.
            Empty: ``test`` evaluates the folders ``fit`` writes under ``results_dir``.
        backbone_weights: ``null`` for torchvision's ImageNet ``IMAGENET1K_V1`` weights from the
            torch cache (``$TORCH_HOME/hub/checkpoints``); a path to a state_dict file; ``random``
            for seeded random weights (demo and tests only); or a mapping from backbone name
            (e.g. ``wideresnet101``) to one of these, for ensembles.
        knn_backend: the nearest-neighbour search: ``auto`` (faiss on a CPU; on a GPU faiss's GPU
            index when the installed faiss has one, else the exact torch search on the GPU),
            ``faiss`` or ``torch``. The banks live on the device the model runs on.
        faiss_on_gpu: replaced by ``knn_backend``; setting it is an error that says so.
        save_segmentation_images: ``test`` writes ``segmentation_images/<dataset>/<anomaly>_<stem>.png``
            (image | ground truth | heatmap, with the score) under ``results_dir``.
        allow_other_weights: evaluate a model folder whose sidecar records other backbone weights
            (sha256) than ``backbone_weights`` gives; refused by default.
        allow_tf32: let cuDNN and cuBLAS use TF32 on Ampere and newer GPUs: faster, but the
            backbone's convolutions then round their inputs to 10 bits (2^-11, ~8,000 times float32's
            2^-24), so the metrics move (``benchmarks/gpu_equivalence.py`` bounds how far on its
            data); the search's products and the maps' blur stay float32 (``precision``). Off by
            default so that a GPU gives the CPU's numbers. The CLI sets torch's flags from it; the
            module itself changes no global state.
        original_bn_warmup: replay the original's one train-mode forward pass of an all-ones
            image, which shifts the BatchNorm running statistics of every backbone it builds (see
            docs/computation.md). Models made by the original (and by ``fit``) need it for their numbers.
        image_threshold: for ``predict``: raw image score from which an image counts as anomalous
            (adds the ``is_anomalous`` column to predictions.csv).
        pixel_threshold: for ``predict``: raw segmentation value from which a pixel counts as
            anomalous (adds ``heatmaps/<path>_mask.png`` and the ``anomalous_pixels`` column).
        thresholds_csv: for ``predict``: a thresholds.csv written by ``test``, whose row for the
            model (the model folder's name, else the data's first category) gives both thresholds.
        heatmap_max: for ``predict``: the raw segmentation value drawn at the top of the heatmaps'
            colour scale (0 at the bottom), the same for every image; defaults to image_threshold,
            and to each image's own maximum when neither is given.
        save_raw_maps: for ``predict``: also write each raw segmentation map as ``.npy``.
        backbones: for ``fit``: one ensemble member per backbone.
        layers: for ``fit``: layers to extract (dotted module paths), for every backbone, or a mapping
            from backbone name to its layers (e.g. densenet201: [features.denseblock2, features.denseblock3]).
        pretrain_embed_dimension: for ``fit``: per-layer feature size after the first adaptive average pooling.
        target_embed_dimension: for ``fit``: final patch feature size (the memory bank's dimension).
        patchsize: for ``fit``: side of the neighbourhood aggregated around every feature position.
        anomaly_scorer_num_nn: for ``fit``: nearest bank vectors whose squared distances are averaged.
        sampler: for ``fit``: memory bank subsampling of the training patch features.
        percentage: for ``fit``: fraction of the training patch features kept by the sampler, in (0, 1].
    """

    def __init__(
        self,
        model_paths: list[str] | None = None,
        backbone_weights: BackboneWeights = None,
        knn_backend: KnnBackend = "auto",
        faiss_on_gpu: bool | None = None,
        save_segmentation_images: bool = False,
        allow_other_weights: bool = False,
        allow_tf32: bool = False,
        original_bn_warmup: bool = True,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        thresholds_csv: str | None = None,
        heatmap_max: float | None = None,
        save_raw_maps: bool = False,
        backbones: list[str] = ["wideresnet50"],  # noqa: B006  (read-only; the CLI needs a literal)
        layers: list[str] | dict[str, list[str]] = ["layer2", "layer3"],  # noqa: B006
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        patchsize: int = 3,
        anomaly_scorer_num_nn: int = 1,
        sampler: SamplerName = "approx_greedy_coreset",
        percentage: float = 0.1,
    ) -> None:
        super().__init__()
        if faiss_on_gpu is not None:
            raise ValueError(
                "model.faiss_on_gpu is replaced by model.knn_backend (auto, faiss or torch): the banks now live "
                "on the model's device; remove faiss_on_gpu from the config"
            )
        if heatmap_max is not None and heatmap_max <= 0:
            raise ValueError(f"model.heatmap_max must be > 0, got {heatmap_max}")
        if thresholds_csv is not None and (image_threshold is not None or pixel_threshold is not None):
            raise ValueError("give model.thresholds_csv or model.image_threshold / model.pixel_threshold, not both")
        if not backbones:
            raise ValueError("model.backbones is empty: name at least one backbone")
        if isinstance(layers, dict):
            missing = [b for b in backbones if b not in layers]
            if missing:
                raise ValueError(f"model.layers has no entry for backbones {missing} (it has {sorted(layers)})")
        if not 0 < percentage <= 1:
            raise ValueError(f"model.percentage must be in (0, 1], got {percentage}")
        sizes = {"pretrain_embed_dimension": pretrain_embed_dimension, "target_embed_dimension": target_embed_dimension,
                 "patchsize": patchsize, "anomaly_scorer_num_nn": anomaly_scorer_num_nn}
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False  # nothing is trained: fit only collects features
        self.backbone_cache = Backbones(backbone_weights, original_bn_warmup)
        self.model: PatchCore | None = None
        self.model_path: str | None = None  # the folder ``model`` was loaded from
        self.evaluation = PatchCoreEvaluation()
        self.seed = 0  # seeds the coreset's generator; the CLI sets it to the run's seed_everything
        self.n_train_images = 0  # images the banks of ``model`` were fit on
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold  # predict's, resolved in setup
        self._features: list[list[torch.Tensor]] = []
        self._indices: list[torch.Tensor] = []
        self._said_where = False

    # ------------------------------------------------------------------ which model
    def select_model(self, folder: str) -> None:
        """Evaluate the model in ``folder`` from now on; it is loaded in ``setup``."""
        if folder != self.model_path:
            self.model_path, self.model = folder, None

    def member_params(self, imagesize: int) -> list[PatchCoreParams]:
        """The parameters of every member ``fit`` builds, in the original's terms."""
        h = self.hparams
        return member_params(h.backbones, h.layers, imagesize, h.pretrain_embed_dimension, h.target_embed_dimension,
                             h.patchsize, h.anomaly_scorer_num_nn)

    def setup(self, stage: str) -> None:
        # whatever the Trainer resolved its strategy to (auto with devices > 1, num_nodes from a
        # SLURM or torchrun launch, a DDPStrategy given as a class): the frozen model stays unwrapped
        leave_model_unwrapped(self.trainer.strategy)
        imagesize = self.trainer.datamodule.imagesize
        resize = getattr(self.trainer.datamodule.hparams, "resize", None)  # the data's, recorded by save
        if stage == "fit":
            params = self.member_params(imagesize)
            self.model = PatchCore(params, [self.backbone_cache.get(p) for p in params], resize=resize)
            self.model_path = None
            return
        if stage == "predict" and self.model_path is None:
            paths = self.hparams.model_paths or []
            if len(paths) != 1:
                raise ValueError(f"predict scores with one model folder; model.model_paths has {len(paths)}")
            self.model_path = paths[0]
        if stage == "predict" and self.hparams.thresholds_csv:
            self.image_threshold, self.pixel_threshold = self._thresholds_from_csv()
        if self.model is None:
            if self.model_path is None:
                raise ValueError("model.model_paths is empty: give the model folder(s) to evaluate")
            h = self.hparams
            self.model = PatchCore.from_folder(
                self.model_path, imagesize, self.backbone_cache, h.knn_backend, h.allow_other_weights, resize=resize
            )

    def _thresholds_from_csv(self) -> tuple[float | None, float | None]:
        """The image and pixel thresholds of the model's row of ``thresholds_csv`` (None where NaN)."""
        path = self.hparams.thresholds_csv
        try:
            rows = read_thresholds(path)
        except OSError as err:
            raise FileNotFoundError(f"model.thresholds_csv {path} cannot be read: {err.strerror or err}") from None
        names = [os.path.basename(os.path.normpath(self.model_path)), self.trainer.datamodule.dataset_name]
        name = next((n for n in names if n in rows), None)
        if name is None:
            raise ValueError(f"{path} has no row for this model ({' or '.join(dict.fromkeys(names))}); it has {sorted(rows)}")
        row = rows[name]
        log.info("thresholds of %s from %s: image %.6g, pixel %.6g", name, path, row["image_threshold"], row["pixel_threshold"])
        return tuple(None if math.isnan(row[k]) else row[k] for k in ("image_threshold", "pixel_threshold"))

    def _say_where_once(self) -> None:
        """Which search runs where, once per run; a warning when it is a CPU search behind a GPU."""
        if not self._said_where and self.model is not None and self.model.banks is not None:
            bank = self.model.banks[0]
            behind = bank.kind == "faiss" and bank.vectors.device.type != "cpu"
            (log.warning if behind else log.info)("nearest-neighbour search: %s", bank.describe())
            self._said_where = True

    # ------------------------------------------------------------------ batches
    def _batch_indices(self, loader: str, batch_idx: int, indices: torch.Tensor) -> list[int]:
        """The batch's dataset indices as the loader's batch sampler dealt them (``ShardBatches``), read
        on the host, so that no step waits for the device to tell which items are placeholders;
        ``indices`` itself outside Lightning's loops or with another sampler. ``loader``: the Trainer's
        attribute holding the running DataLoader."""
        dataloader = getattr(self._trainer, loader, None) if self._trainer is not None else None
        batches = getattr(getattr(dataloader, "batch_sampler", None), "batches", None)
        if batches is not None and batch_idx < len(batches) and len(batches[batch_idx]) == len(indices):
            return batches[batch_idx]
        return indices.tolist()

    @staticmethod
    def _real_rows(indices: list[int]) -> list[int] | None:
        """The batch positions of real items (not ``PADDING_INDEX``); None when every item is real."""
        real = [i for i, index in enumerate(indices) if index != PADDING_INDEX]
        return None if len(real) == len(indices) else real

    # ------------------------------------------------------------------ fit
    def configure_optimizers(self) -> None:
        return None

    def on_train_epoch_start(self) -> None:
        self._features = [[] for _ in range(len(self.model))]
        self._indices = []

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Every member's patch features of the batch's images, kept on the device until the epoch ends."""
        images, _, _, indices = batch
        # a DDP rank's placeholders give no features (but the shapes)
        real = self._real_rows(self._batch_indices("train_dataloader", batch_idx, indices))
        with torch.no_grad():
            for m, features in enumerate(self._features):
                feats, (h, w) = self.model.patch_features(images, m)  # (B*h*w, D)
                feats = feats.view(len(images), h * w, -1)  # (B, h*w, D)
                features.append((feats if real is None else feats[real]).flatten(0, 1))  # (b*h*w, D)
        self._indices.append(indices if real is None else indices[real])

    def on_train_epoch_end(self) -> None:
        """Each member's features of every training image (from every process), in image order,
        subsampled into its memory bank."""
        indices = _gather_rows(torch.cat(self._indices))  # (N,) image indices, in arrival order
        order = torch.argsort(indices)
        n_images = len(indices)
        h = self.hparams
        banks = []
        for p, parts in zip(self.model.params, self._features):
            features = _gather_rows(concat_freeing(parts))  # (N*h*w, D), images in arrival order
            if not torch.equal(order, torch.arange(n_images, device=order.device)):
                features = features.view(n_images, -1, features.shape[1])[order].flatten(0, 1)
            banks.append(build_bank(features, h.sampler, h.percentage, self.seed, h.knn_backend, p.backbone))
        self.model.banks = torch.nn.ModuleList(banks)
        self.n_train_images = n_images
        self._features, self._indices = [], []

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self) -> None:
        self._say_where_once()
        self.evaluation.reset()

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> dict[str, torch.Tensor]:
        """The batch's raw outputs into the metric; returns the raw scores (b, M), labels and indices."""
        images, masks, labels, indices = batch
        raw_scores, raw_maps = self.model(images)  # (B, M), (B, M, H, W)
        real = self._real_rows(self._batch_indices("test_dataloaders", batch_idx, indices))
        if real is not None:  # a DDP rank's placeholder: nothing to score, but the states keep their shapes
            raw_scores, raw_maps, masks, labels, indices = (x[real] for x in (raw_scores, raw_maps, masks, labels, indices))
        self.evaluation.update(raw_scores, raw_maps, masks, labels, indices)
        return {"raw_scores": raw_scores, "labels": labels, "indices": indices}

    def on_test_epoch_end(self) -> None:
        """The category's metrics: every process gathers every image's outputs and computes them;
        the ``Evaluation`` goes to the Trainer's ``EvaluationReceiver`` callbacks."""
        evaluation = self.evaluation.compute()
        self.evaluation.reset()
        name = self.trainer.datamodule.dataset_name
        # every process holds the same numbers (computed from the gathered states): the mean is them
        self.log_dict({f"test/{name}/{k}": v for k, v in evaluation.row().items()}, sync_dist=True)
        for callback in self.trainer.callbacks:
            if isinstance(callback, EvaluationReceiver):
                callback.on_evaluation(self.trainer, self, evaluation)

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        self._say_where_once()

    def predict_step(self, batch: tuple, batch_idx: int) -> dict:
        """The batch's dataset ``indices`` (a list) and its readable images (``rows``, their positions in
        the batch): raw scores (b, M), their mean ``score`` (b,), the mean raw segmentation (b, H, W)
        and, with a pixel threshold, the number of pixels at or above it (b,), all on the device (the
        prediction writer takes them to the host, once per batch)."""
        images, indices, errors = batch
        host = self._batch_indices("predict_dataloaders", batch_idx, indices)
        rows = [i for i, (index, error) in enumerate(zip(host, errors)) if not error and index >= 0]
        out = {"rows": rows, "indices": host, "raw_scores": None, "score": None, "raw_maps": None,
               "anomalous_pixels": None}
        if not rows:
            return out
        raw_scores, raw_maps = self.model(images[rows])  # (b, M), (b, M, H, W)
        mean_maps = raw_maps.mean(dim=1)  # (b, H, W): what test's pixel threshold is computed on
        out.update(raw_scores=raw_scores, score=raw_scores.mean(dim=1), raw_maps=mean_maps)
        if self.pixel_threshold is not None:
            out["anomalous_pixels"] = (mean_maps >= self.pixel_threshold).flatten(1).sum(dim=1)
        return out


class EvaluationReceiver(Callback):
    """A callback that receives every category's ``metrics.Evaluation`` as a value: ``PatchCoreModule``
    calls ``on_evaluation`` of each such callback of its Trainer when a test epoch's metric is computed
    (on every process, with the same gathered result)."""

    def on_evaluation(self, trainer: L.Trainer, pl_module: PatchCoreModule, evaluation: Evaluation) -> None:
        """One category's evaluation; nothing by default."""


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(n_r, *S) tensors of every process concatenated in rank order (n_r may differ); ``x`` itself
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    count = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(counts))
    padded = x.new_zeros(longest, *x.shape[1:])
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts)])


class FrozenModelDDPStrategy(DDPStrategy):
    """DDP for a model without trainable parameters: DDP's processes and collectives, without
    ``DistributedDataParallel`` around the module. torch refuses to wrap a module with nothing to
    train, and there are no gradients to synchronise; Lightning leaves the module unwrapped when
    testing and predicting alike."""

    def configure_ddp(self) -> None:
        pass


def frozen_model_strategy(strategy: str | Strategy | None) -> FrozenModelDDPStrategy | None:
    """The ``FrozenModelDDPStrategy`` that stands in for a DDP strategy given by name (``ddp``,
    ``ddp_spawn``, ...); None for anything else (``leave_model_unwrapped`` covers the strategies
    the Trainer resolves itself)."""
    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return None
    entry = StrategyRegistry[strategy]
    if entry["strategy"] is not DDPStrategy:
        return None
    return FrozenModelDDPStrategy(**entry["init_params"])


def leave_model_unwrapped(strategy: Strategy) -> None:
    """Make a Trainer's DDP strategy a ``FrozenModelDDPStrategy`` in place, however it was chosen:
    ``auto`` with several devices or nodes, a DDP name, a ``DDPStrategy`` instance. Its processes,
    devices, cluster environment and settings stay; only the ``DistributedDataParallel`` wrapping
    (which torch refuses for a module with nothing to train) is left out. Other strategies are left
    as they are; a subclass of ``DDPStrategy`` with its own behaviour is refused rather than changed.
    """
    if not isinstance(strategy, DDPStrategy) or isinstance(strategy, FrozenModelDDPStrategy):
        return
    if type(strategy) is not DDPStrategy:
        raise ValueError(
            f"trainer.strategy {type(strategy).__name__} wraps the model for training, and PatchCore trains "
            f"nothing; use strategy auto or ddp (ddp_spawn, ddp_fork, ...) for several devices"
        )
    # the subclass only leaves out configure_ddp's wrapping: same state, so the instance can change class
    strategy.__class__ = FrozenModelDDPStrategy
