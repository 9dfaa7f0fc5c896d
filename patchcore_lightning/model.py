"""PatchCore as a plain torch module: frozen backbones, locally aware patch features, memory banks.

Notation: B images of H×W pixels, M members (an ensemble; a single model is an ensemble of one),
(h, w) a member's patch grid, D its bank's dimension.

For each member: the truncated backbone maps the images to its layers' feature maps; ``embed``
turns them into one D-dimensional feature per patch; each patch scores the mean squared L2
distance to its k nearest bank vectors; the image score is the largest patch score, and the
segmentation the patch scores upsampled to H×W and blurred. Nothing here is normalised: that
needs the whole test set (``metrics.ensemble``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import faiss
import torch
import torchvision
from torch import nn

from .anomaly_map import segmentation_maps
from .backbones import BackboneWeights, LayerError, WeightsError, load_feature_extractor, original_bn_warmup
from .embedding import embed
from .memory_bank import KnnBackend, MemoryBank
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

__all__ = ["Backbones", "PatchCore"]

log = logging.getLogger(__name__)


class Backbones:
    """Truncated, frozen backbones by (name, layers, input shape), each built once and then shared
    by the members and categories that use it.

    Args:
        weights: where the weights come from (``backbones.BackboneWeights``).
        bn_warmup: replay the original's train-mode pass of an all-ones image on each new backbone
            (``backbones.original_bn_warmup``); it depends on the input shape, hence the key.
    """

    def __init__(self, weights: BackboneWeights = None, bn_warmup: bool = True) -> None:
        self.weights = weights
        self.bn_warmup = bn_warmup
        self.sha256: dict[str, str | None] = {}  # backbone name → sha256 of its weights file (None: random)
        self._built: dict[tuple, nn.Module] = {}

    def get(self, params: PatchCoreParams) -> nn.Module:
        key = (params.backbone, tuple(params.layers), tuple(params.input_shape))
        if key not in self._built:
            extractor, self.sha256[params.backbone] = load_feature_extractor(
                params.backbone, params.layers, self.weights
            )
            if self.bn_warmup:
                original_bn_warmup(extractor, params.input_shape)
            self._built[key] = extractor
        return self._built[key]


class PatchCore(nn.Module):
    """M PatchCore models that score the same images: images (B, 3, H, W) ImageNet-normalised →
    raw image scores (B, M) and raw segmentations (B, M, H, W).

    Args:
        params: each member's parameters, in the original's terms.
        extractors: each member's truncated backbone (members may share one).
        banks: each member's memory bank; None while the model is being fit.
    """

    def __init__(
        self,
        params: Sequence[PatchCoreParams],
        extractors: Sequence[nn.Module],
        banks: Sequence[MemoryBank] | None = None,
    ) -> None:
        super().__init__()
        if len(extractors) != len(params) or (banks is not None and len(banks) != len(params)):
            raise ValueError("give one extractor and one memory bank per member")
        self.params = list(params)
        self.extractors = nn.ModuleList(extractors)
        self.banks = nn.ModuleList(banks) if banks is not None else None

    def __len__(self) -> int:
        return len(self.params)

    def train(self, mode: bool = True) -> PatchCore:
        """The backbones stay in eval mode: they are frozen, and BatchNorm must use its running
        statistics (a training loop's ``train()`` must not switch it to batch statistics)."""
        super().train(mode)
        for extractor in self.extractors:
            extractor.eval()
        return self

    def patch_features(self, images: torch.Tensor, member: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) → the member's patch features (B*h*w, D), rows ordered (B, h, w), and (h, w)."""
        p = self.params[member]
        layer_maps = self.extractors[member](images)  # {layer: (B, C, h_l, w_l)}
        layers = [layer_maps[layer] for layer in p.layers]
        return embed(layers, p.patchsize, p.patchstride, p.pretrain_embed_dimension, p.target_embed_dimension)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) → raw image scores (B, M), raw segmentations (B, M, H, W)."""
        if self.banks is None:
            raise RuntimeError("this PatchCore has no memory banks yet: fit it or load a model folder")
        B, _, H, W = images.shape
        scores, maps = [], []
        for m, (p, bank) in enumerate(zip(self.params, self.banks)):
            feats, (h, w) = self.patch_features(images, m)  # (B*h*w, D)
            patch = bank.patch_scores(feats, p.anomaly_scorer_num_nn).view(B, h, w)  # (B, h, w)
            scores.append(patch.flatten(1).amax(dim=1))  # (B,)
            maps.append(segmentation_maps(patch, (H, W)))  # (B, H, W)
        return torch.stack(scores, dim=1), torch.stack(maps, dim=1)

    # ------------------------------------------------------------------ the original's folders
    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        imagesize: int,
        backbones: Backbones,
        knn_backend: KnnBackend = "auto",
        allow_other_weights: bool = False,
    ) -> PatchCore:
        """The model saved in ``folder`` (the original's format, single or ensemble), for images of
        ``imagesize``², with backbones from ``backbones``.

        Refuses a folder whose sidecar records other backbone weights than ``backbones`` gives,
        unless ``allow_other_weights``.
        """
        params, extractors, banks = [], [], []
        for files in find_members(folder):
            p = read_params(files.params)
            if tuple(p.input_shape[1:]) != (imagesize, imagesize):
                raise ModelFormatError(
                    f"{files.params}: the model was built for input_shape {p.input_shape}, "
                    f"but data.imagesize is {imagesize}"
                )
            bank = MemoryBank.load(files.index, knn_backend)
            if bank.dim != p.target_embed_dimension or len(bank) == 0:
                raise ModelFormatError(
                    f"{files.index}: index holds {len(bank)} vectors of dimension {bank.dim}; expected a "
                    f"non-empty bank of target_embed_dimension={p.target_embed_dimension}"
                )
            if p.anomaly_scorer_num_nn > len(bank):
                raise ModelFormatError(
                    f"{files.params}: anomaly_scorer_num_nn={p.anomaly_scorer_num_nn} exceeds the bank size {len(bank)}"
                )
            try:
                extractors.append(backbones.get(p))
            except LayerError as err:
                raise ModelFormatError(f"{folder}: {err}") from None
            params.append(p)
            banks.append(bank)
        _check_weights(folder, [p.backbone for p in params], backbones.sha256, allow_other_weights)
        return cls(params, extractors, banks)

    def save(self, folder: str | os.PathLike, sidecar: dict | None = None) -> Path:
        """Write the members in the original's folder format, and ``sidecar`` (our JSON, which the
        original ignores) with the library versions added."""
        if self.banks is None:
            raise RuntimeError("this PatchCore has no memory banks to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(self)
        for i, (params, bank) in enumerate(zip(self.params, self.banks), start=1):
            write_params(folder / f"{member_prefix(i, n)}{PARAMS_FILE}", params)
            bank.save(folder / f"{member_prefix(i, n)}{INDEX_FILE}")
        versions = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "faiss": faiss.__version__,
        }
        record = {**(sidecar or {}), "bank_sizes": [len(b) for b in self.banks], "versions": versions}
        (folder / SIDECAR_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return folder


def _describe_weights(sha256: str | None) -> str:
    return f"weights sha256 {sha256[:12]}..." if sha256 else "random weights"


def _check_weights(
    folder: str | os.PathLike, names: list[str], actual: dict[str, str | None], allow_other: bool
) -> None:
    """Refuse other backbone weights than the ones our sidecar says the folder was built with."""
    sidecar = read_sidecar(folder)
    if sidecar is None:
        log.info("%s has no %s (the original's format): its backbone weights cannot be checked", folder, SIDECAR_FILE)
        return
    recorded = sidecar.get("weights_sha256", {})
    for name in dict.fromkeys(names):
        if name in recorded and recorded[name] != actual.get(name):
            message = (
                f"{folder} was built with {name} {_describe_weights(recorded[name])}, but backbone_weights gives "
                f"{_describe_weights(actual.get(name))}; pass the same weights or --model.allow_other_weights true"
            )
            if not allow_other:
                raise WeightsError(message)
            log.warning("%s (allowed by allow_other_weights)", message)
