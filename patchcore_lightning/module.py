"""PatchCoreModule: frozen backbones + faiss memory banks, evaluated one category at a time."""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import lightning as L
import numpy as np
import torch
import torchvision
from torch import nn

from .anomaly_map import segmentation_maps
from .backbones import BackboneWeights, LayerError, WeightsError, load_feature_extractor, original_bn_warmup
from .coreset import SamplerName, subsample
from .embedding import embed
from .heap import release_free_heap
from .memory_bank import MemoryBank, gpu_faiss_available, warn_gpu_unavailable
from .metrics import PatchCoreEvaluation
from .model_io import (
    INDEX_FILE,
    PARAMS_FILE,
    SIDECAR_FILE,
    ModelFormatError,
    PatchCoreParams,
    find_members,
    member_prefix,
    read_params,
    read_sidecar,
    write_params,
)
from .reporting import blend, compose

__all__ = ["Member", "PatchCoreModule", "embed_images"]

log = logging.getLogger(__name__)


def embed_images(
    layer_feats: Sequence[torch.Tensor], patchsize: int, stride: int, pretrain_dim: int, target_dim: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``embed`` as fit and test run it: [(B, C_i, h_i, w_i)] → (B*H0*W0, target_dim), (H0, W0).

    On the CPU one image at a time: the same bits as the whole batch (every patch feature depends
    on its own image only), with working memory, which is the process's RSS, bounded by one image
    instead of growing with the batch, and an image's intermediate maps (a few MB with
    WideResNet50 at 224²) staying in the caches. On a GPU the batch goes in one call: per-image
    kernel launches would cost more than that memory.
    """
    B = layer_feats[0].shape[0]
    if B <= 1 or layer_feats[0].device.type != "cpu":
        return embed(layer_feats, patchsize, stride, pretrain_dim, target_dim)
    parts = [
        embed([feats[b : b + 1] for feats in layer_feats], patchsize, stride, pretrain_dim, target_dim)
        for b in range(B)
    ]  # [((H0*W0, target_dim), (H0, W0))] per image
    return torch.cat([feats for feats, _ in parts]), parts[0][1]  # (B*H0*W0, target_dim), rows ordered (B, H0, W0)


def _describe_weights(sha256: str | None) -> str:
    return f"weights sha256 {sha256[:12]}..." if sha256 else "random weights"


@dataclass
class Member:
    """One PatchCore model of an ensemble: its parameters, backbone key and memory bank."""

    params: PatchCoreParams
    extractor_key: str
    bank: MemoryBank


class PatchCoreModule(L.LightningModule):
    """PatchCore evaluation of saved models in the original's folder format.

    Args:
        model_paths: one model folder per category of ``data.categories``, or exactly one folder
            used for every category. A folder holds ``patchcore_params.pkl`` and
            ``nnscorer_search_index.faiss``, or ``Ensemble-<i>-<n>_`` prefixed files of n members.
        backbone_weights: ``null`` for torchvision's ImageNet ``IMAGENET1K_V1`` weights from the
            torch cache (``$TORCH_HOME/hub/checkpoints``); a path to a state_dict file; ``random``
            for seeded random weights (demo and tests only); or a mapping from backbone name
            (e.g. ``wideresnet101``) to one of these, for ensembles.
        faiss_on_gpu: run the nearest-neighbour search on the GPU (needs a faiss GPU build; warns
            and stays on the CPU otherwise).
        save_segmentation_images: write ``segmentation_images/<dataset>/<anomaly>_<stem>.png``
            (image | ground truth | heatmap, with the score) under ``results_dir``.
        allow_other_weights: evaluate a model folder whose sidecar records other backbone weights
            (sha256) than ``backbone_weights`` gives; refused by default.
        allow_tf32: let cuDNN and cuBLAS use TF32 on Ampere and newer GPUs (faster, but metrics
            drift by ~1e-4 from fp32); off by default so that a GPU gives the CPU's numbers.
        original_bn_warmup: replay the original's one train-mode forward pass of an all-ones
            image, which shifts the BatchNorm running statistics of every backbone it builds (see
            README). Models made by the original (and by our ``fit``) need it to give their numbers.
        image_threshold: for ``predict``: raw image score from which an image counts as anomalous
            (adds the ``is_anomalous`` column to predictions.csv).
        heatmap_max: for ``predict``: the raw segmentation value drawn at the top of the heatmaps'
            colour scale (0 at the bottom), the same for every image; defaults to image_threshold,
            and to each image's own maximum when neither is given.
        save_raw_maps: for ``predict``: also write each raw segmentation map as ``.npy``.
        backbones: for ``fit`` (and ``test`` without model_paths): one ensemble member per backbone.
        layers: layers to extract (dotted module paths), for every backbone, or a mapping from
            backbone name to its layers (e.g. densenet201: [features.denseblock2, features.denseblock3]).
        pretrain_embed_dimension: per-layer feature size after the first adaptive average pooling.
        target_embed_dimension: final patch feature size (the memory bank's dimension).
        patchsize: side of the neighbourhood aggregated around every feature position.
        anomaly_scorer_num_nn: nearest bank vectors whose squared distances are averaged.
        sampler: memory bank subsampling of the training patch features.
        percentage: fraction of the training patch features kept by the sampler, in (0, 1].
    """

    def __init__(
        self,
        model_paths: list[str] | None = None,
        backbone_weights: BackboneWeights = None,
        faiss_on_gpu: bool = False,
        save_segmentation_images: bool = False,
        allow_other_weights: bool = False,
        allow_tf32: bool = False,
        original_bn_warmup: bool = True,
        image_threshold: float | None = None,
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
        self.save_hyperparameters()
        self.model_paths = list(model_paths) if model_paths else []
        self.backbone_weights = backbone_weights
        self.faiss_on_gpu = faiss_on_gpu
        self.save_segmentation_images = save_segmentation_images
        self.original_bn_warmup = original_bn_warmup
        self.allow_tf32 = allow_tf32
        self.allow_other_weights = allow_other_weights
        self.image_threshold = image_threshold
        if heatmap_max is not None and heatmap_max <= 0:
            raise ValueError(f"model.heatmap_max must be > 0, got {heatmap_max}")
        self.heatmap_max = heatmap_max
        self.save_raw_maps = save_raw_maps
        self.predict_dir_out: Path | None = None  # set by the CLI: where heatmaps go
        self.predictions: list[dict] = []
        if not backbones:
            raise ValueError("model.backbones is empty: name at least one backbone")
        if isinstance(layers, dict):
            missing = [b for b in backbones if b not in layers]
            if missing:
                raise ValueError(f"model.layers has no entry for backbones {missing} (it has {sorted(layers)})")
        if not 0 < percentage <= 1:
            raise ValueError(f"model.percentage must be in (0, 1], got {percentage}")
        for key, value in (("pretrain_embed_dimension", pretrain_embed_dimension),
                           ("target_embed_dimension", target_embed_dimension),
                           ("patchsize", patchsize), ("anomaly_scorer_num_nn", anomaly_scorer_num_nn)):
            if value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        self.backbones = list(backbones)
        self.layers = layers
        self.fit_options = dict(
            pretrain_embed_dimension=pretrain_embed_dimension,
            target_embed_dimension=target_embed_dimension,
            patchsize=patchsize,
            anomaly_scorer_num_nn=anomaly_scorer_num_nn,
        )
        self.sampler = sampler
        self.percentage = percentage
        # Truncated backbones, shared across categories and ensemble members: "<name>:<layers>".
        self.extractors = nn.ModuleDict()
        self.weights_sha256: dict[str, str | None] = {}
        self.members: list[Member] = []
        self.model_path: str | None = None
        self.evaluation = PatchCoreEvaluation()
        self.result: dict | None = None
        # Under DDP a rank may get no image of a small category; it still joins the metric gather.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # ----------------------------------------------------------------- category selection
    def model_path_for(self, index: int, n_categories: int) -> str:
        """The model folder of the ``index``-th of ``n_categories`` categories (the original's rule)."""
        if len(self.model_paths) == 1:
            return self.model_paths[0]
        if len(self.model_paths) != n_categories:
            raise ValueError(
                f"model.model_paths has {len(self.model_paths)} entries for {n_categories} categories: "
                f"give one folder per category, or exactly one for all"
            )
        return self.model_paths[index]

    def select(self, index: int, n_categories: int) -> None:
        """Evaluate the ``index``-th category next; its models are loaded in ``setup``."""
        path = self.model_path_for(index, n_categories)
        if path != self.model_path:
            self.model_path, self.members = path, []

    def _bank_device(self) -> torch.device:
        root = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if not self.faiss_on_gpu:
            return torch.device("cpu")
        if root.type == "cuda" and gpu_faiss_available():
            return root
        warn_gpu_unavailable()
        return torch.device("cpu")

    def _extractor(self, params: PatchCoreParams) -> str:
        # One backbone per (name, layers, input shape): the warm-up pass depends on all three,
        # and the original likewise builds a fresh backbone for every model it loads.
        shape = "x".join(map(str, params.input_shape))
        key = f"{params.backbone}:{'+'.join(params.layers)}:{shape}".replace(".", "_")
        if key not in self.extractors:
            try:
                extractor, digest = load_feature_extractor(params.backbone, params.layers, self.backbone_weights)
            except LayerError as err:
                raise ModelFormatError(f"{self.model_path}: {err}") from None
            self.weights_sha256[params.backbone] = digest
            if self.original_bn_warmup:
                original_bn_warmup(extractor, params.input_shape)
            self.extractors[key] = extractor.to(self.device)
        return key

    def _check_weights(self, folder: str, members: list[Member]) -> None:
        """Refuse other backbone weights than the ones our sidecar says a model was built with."""
        sidecar = read_sidecar(folder)
        if sidecar is None:
            log.info("%s has no %s (the original's format): its backbone weights cannot be checked", folder, SIDECAR_FILE)
            return
        recorded = sidecar.get("weights_sha256", {})
        for member in members:
            name = member.params.backbone
            if name not in recorded:
                continue
            expected, actual = recorded[name], self.weights_sha256.get(name)
            if expected != actual:
                message = (
                    f"{folder} was built with {name} {_describe_weights(expected)}, but backbone_weights gives "
                    f"{_describe_weights(actual)}; pass the same weights or --model.allow_other_weights true"
                )
                if not self.allow_other_weights:
                    raise WeightsError(message)
                log.warning("%s (allowed by allow_other_weights)", message)

    def load_members(self, folder: str, imagesize: int) -> list[Member]:
        members = []
        for files in find_members(folder):
            params = read_params(files.params)
            if tuple(params.input_shape[1:]) != (imagesize, imagesize):
                raise ModelFormatError(
                    f"{files.params}: the model was built for input_shape {params.input_shape}, "
                    f"but data.imagesize is {imagesize}"
                )
            bank = MemoryBank.load(files.index, self._bank_device())
            if bank.dim != params.target_embed_dimension or len(bank) == 0:
                raise ModelFormatError(
                    f"{files.index}: index holds {len(bank)} vectors of dimension {bank.dim}; expected a "
                    f"non-empty bank of target_embed_dimension={params.target_embed_dimension}"
                )
            if params.anomaly_scorer_num_nn > len(bank):
                raise ModelFormatError(
                    f"{files.params}: anomaly_scorer_num_nn={params.anomaly_scorer_num_nn} exceeds the bank size {len(bank)}"
                )
            members.append(Member(params, self._extractor(params), bank))
        self._check_weights(folder, members)
        release_free_heap()  # the warm-up passes' activations and the files' read buffers
        return members

    def setup(self, stage: str) -> None:
        # PyTorch lets cuDNN convolutions use TF32 by default; PatchCore's numbers are fp32 numbers.
        torch.backends.cudnn.allow_tf32 = self.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        if stage == "predict":
            if len(self.model_paths) != 1:
                raise ValueError(f"predict scores with one model folder; model.model_paths has {len(self.model_paths)}")
            self.model_path = self.model_paths[0]
            if not self.members:
                self.members = self.load_members(self.model_path, self.trainer.datamodule.imagesize)
            self.predictions = []
            return
        if stage != "test":
            return
        if self.model_path is None:
            raise ValueError("model.model_paths is empty: give the model folder(s) to evaluate")
        imagesize = self.trainer.datamodule.imagesize
        if not self.members:
            self.members = self.load_members(self.model_path, imagesize)
        self.evaluation.reset()
        self.result = None

    # ----------------------------------------------------------------- building memory banks
    def member_params(self, imagesize: int) -> list[PatchCoreParams]:
        """The parameters of every member ``fit`` builds, in the original's terms."""
        out = []
        for name in self.backbones:
            layers = self.layers[name] if isinstance(self.layers, dict) else self.layers
            out.append(PatchCoreParams(name, tuple(layers), (3, imagesize, imagesize), patchstride=1, **self.fit_options))
        return out

    @torch.no_grad()
    def build_members(self, loader, imagesize: int, seed: int, device: torch.device) -> list[Member]:
        """Embed every training image with every member's backbone, subsample, build the banks."""
        members = []
        for params in self.member_params(imagesize):
            key = self._extractor(params)
            self.extractors[key].to(device)
            feats = [self._patch_features(key, params, images.to(device).float())[0].cpu() for images, *_ in loader]
            features = torch.cat(feats)  # (N_train * h * w, D)
            generator = torch.Generator(device=features.device).manual_seed(seed)
            keep = subsample(features, self.sampler, self.percentage, generator)
            log.info(
                "%s: kept %d of %d patch features (%s, %.4g)",
                params.backbone, len(keep), len(features), self.sampler, self.percentage,
            )
            members.append(Member(params, key, MemoryBank.from_features(features[keep], self._bank_device())))
        return members

    def save_members(self, folder: str | Path, members: list[Member], n_train_images: int) -> Path:
        """Write ``members`` in the original's folder format, plus our JSON sidecar."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(members)
        for i, member in enumerate(members, start=1):
            prefix = member_prefix(i, n)
            write_params(folder / f"{prefix}{PARAMS_FILE}", member.params)
            member.bank.save(folder / f"{prefix}{INDEX_FILE}")
        sidecar = {
            "weights_sha256": {m.params.backbone: self.weights_sha256.get(m.params.backbone) for m in members},
            "backbone_weights": self.backbone_weights,
            "original_bn_warmup": self.original_bn_warmup,
            "sampler": self.sampler,
            "percentage": self.percentage,
            "n_train_images": n_train_images,
            "bank_sizes": [len(m.bank) for m in members],
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "faiss": faiss.__version__,
                "lightning": L.__version__,
            },
        }
        (folder / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
        return folder

    # ----------------------------------------------------------------- the computation
    def _patch_features(
        self, key: str, p: PatchCoreParams, images: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) → patch features (B*h*w, D) and the grid (h, w), as fit and test see them."""
        layer_maps = self.extractors[key](images)  # {layer: (B, C, h, w)}
        return embed_images(
            [layer_maps[layer] for layer in p.layers],
            p.patchsize,
            p.patchstride,
            p.pretrain_embed_dimension,
            p.target_embed_dimension,
        )

    def member_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image scores (B, M) and segmentations (B, M, H, W) of every member."""
        B, _, H, W = images.shape
        scores, maps = [], []
        for member in self.members:
            p = member.params
            feats, (h, w) = self._patch_features(member.extractor_key, p, images)  # (B*h*w, D)
            patch = member.bank.patch_scores(feats, p.anomaly_scorer_num_nn).view(B, h, w)  # (B, h, w)
            scores.append(patch.flatten(1).amax(dim=1))  # (B,)
            maps.append(segmentation_maps(patch, (H, W)))  # (B, H, W)
        return torch.stack(scores, dim=1), torch.stack(maps, dim=1)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        images, masks, labels, indices = batch
        raw_scores, raw_maps = self.member_outputs(images.float())
        self.evaluation.update(raw_scores, raw_maps, masks, labels, indices)

    def predict_step(self, batch: tuple, batch_idx: int) -> None:
        """Raw scores of readable images; heatmaps written as they come (nothing kept per pixel)."""
        images, indices, errors = batch
        dataset = self.trainer.datamodule.predict_dataset
        ok = [i for i, e in enumerate(errors) if not e]
        for i, error in enumerate(errors):
            if error:
                self.predictions.append({"path": dataset.relative(int(indices[i])), "error": error})
        if not ok:
            return
        raw_scores, raw_maps = self.member_outputs(images[ok].float())  # (b, M), (b, M, H, W)
        maps = raw_maps.mean(dim=1)  # (b, H, W)
        for k, i in enumerate(ok):
            path = dataset.relative(int(indices[i]))
            self.predictions.append({"path": path, "scores": raw_scores[k].tolist()})
            if self.predict_dir_out is not None:
                self._write_heatmap(dataset, int(indices[i]), path, maps[k])

    def _write_heatmap(self, dataset, index: int, path: str, raw_map: torch.Tensor) -> None:
        """``heatmaps/<path>.png``: the image | the raw map over it on the fixed scale [0, heatmap_max]."""
        top = self.heatmap_max or self.image_threshold or float(raw_map.max()) or 1.0
        target = self.predict_dir_out / "heatmaps" / f"{path}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shown = dataset.display_image(index)
        caption = f"{path}  max {float(raw_map.max()):.4g}  scale 0..{top:.4g}"
        compose([shown, blend(shown, (raw_map / top).clamp(0, 1))], caption).save(target)
        if self.save_raw_maps:
            np.save(target.with_suffix(".npy"), raw_map.cpu().numpy())

    @torch.no_grad()
    def finish_category(self) -> dict:
        """Gather the category's states from every rank and compute its metrics (call on all ranks).

        Called after ``trainer.test`` rather than in a test hook: Lightning skips the hooks of a
        rank whose shard is empty, and every rank must join the gather.
        """
        device = self.trainer.strategy.root_device
        self.evaluation.to(device)  # Lightning's teardown moved the module to the CPU
        if self.evaluation.update_count == 0:
            # A rank with no image (fewer images than ranks) joins with empty states of the right shapes.
            S, M = self.trainer.datamodule.imagesize, len(self.members)
            empty = torch.empty(0, dtype=torch.long, device=device)
            self.evaluation.update(
                torch.empty(0, M, device=device),
                torch.empty(0, M, S, S, device=device),
                torch.empty(0, S, S, dtype=torch.uint8, device=device),
                empty,
                empty,
            )
        self.result = self.category_result()
        return self.result

    def category_result(self) -> dict:
        """The category's metrics and normalised outputs from the accumulated (under DDP, gathered) states."""
        release_free_heap()  # the batches' working memory, before the category's maps are normalised
        return self.evaluation.compute_uncached()

    @property
    def member_descriptions(self) -> list[str]:
        return [f"{m.params.backbone}[{','.join(m.params.layers)}] bank {len(m.bank)}x{m.bank.dim}" for m in self.members]
