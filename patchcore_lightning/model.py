"""PatchCore as a plain torch module: frozen backbones, locally aware patch features, memory banks.

Notation: B images of H×W pixels, M members (an ensemble; a single model is an ensemble of one),
(h, w) a member's patch grid, D its bank's dimension.

For each member: the truncated backbone maps the images to its layers' feature maps; ``embed``
turns them into one D-dimensional feature per patch; each patch scores the mean squared L2
distance to its k nearest bank vectors; the image score is the largest patch score, and the
segmentation the patch scores upsampled to H×W and blurred. Nothing here is normalised: that
needs the whole test set (``metrics.evaluate``).

The model stands alone: ``PatchCore.from_folder`` loads a model folder (the original's format),
``transform`` makes the tensor ``test`` and ``predict`` feed it from a PIL image, ``PatchCore.fit``
builds the banks from training images (``build_bank``, which ``PatchCoreModule`` calls too), and
``save`` writes the original's format. None of it touches global state (RNG, warning filters,
TF32 flags): the coreset draws from a generator of its own, seeded by the ``seed`` passed in.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import faiss
import torch
import torchvision
from PIL import Image
from torch import nn

from .anomaly_map import segmentation_maps
from .backbones import BackboneWeights, LayerError, WeightsError, load_feature_extractor, original_bn_warmup
from .coreset import SamplerName, subsample
from .data.images import ImageTransform
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

__all__ = ["Backbones", "PatchCore", "build_bank", "concat_freeing", "default_resize", "member_params"]

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


def default_resize(imagesize: int) -> int:
    """The resize (shorter side, before the centre crop) the original pairs with a crop of
    ``imagesize``: its ratio 256 / 224, rounded (256 for 224, 366 for 320)."""
    return round(imagesize * 256 / 224)


def member_params(
    backbones: Sequence[str],
    layers: Sequence[str] | Mapping[str, Sequence[str]],
    imagesize: int,
    pretrain_embed_dimension: int = 1024,
    target_embed_dimension: int = 1024,
    patchsize: int = 3,
    anomaly_scorer_num_nn: int = 1,
) -> list[PatchCoreParams]:
    """The parameters, in the original's terms, of one member per backbone name (see ``PatchCore.fit``)."""
    if isinstance(backbones, str) or not backbones:
        raise ValueError(f"backbones must be a non-empty list of backbone names, got {backbones!r}")
    if isinstance(layers, Mapping):
        missing = [b for b in backbones if b not in layers]
        if missing:
            raise ValueError(f"layers has no entry for backbones {missing} (it has {sorted(layers)})")
    elif isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be a non-empty list of layer names (or a mapping per backbone), got {layers!r}")
    sizes = {"imagesize": imagesize, "pretrain_embed_dimension": pretrain_embed_dimension,
             "target_embed_dimension": target_embed_dimension, "patchsize": patchsize,
             "anomaly_scorer_num_nn": anomaly_scorer_num_nn}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return [
        PatchCoreParams(
            backbone=name,
            layers=tuple(layers[name] if isinstance(layers, Mapping) else layers),
            input_shape=(3, imagesize, imagesize),
            pretrain_embed_dimension=pretrain_embed_dimension,
            target_embed_dimension=target_embed_dimension,
            patchsize=patchsize,
            patchstride=1,
            anomaly_scorer_num_nn=anomaly_scorer_num_nn,
        )
        for name in backbones
    ]


def concat_freeing(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, emptying ``parts`` as it goes: at most one part is held twice, not all
    of them (the training features of a category are the largest tensors of a fit)."""
    out = parts[0].new_empty(sum(len(part) for part in parts), *parts[0].shape[1:])
    start = 0
    while parts:
        part = parts.pop(0)
        out[start : start + len(part)] = part
        start += len(part)
    return out


def build_bank(
    features: torch.Tensor,
    sampler: SamplerName,
    percentage: float,
    seed: int,
    knn_backend: KnnBackend = "auto",
    name: str = "memory bank",
) -> MemoryBank:
    """A member's memory bank: the rows of its training patch features (N*h*w, D), in image order,
    that ``sampler`` keeps (``coreset.subsample``).

    The sampler draws from a CPU generator of its own seeded with ``seed`` (a member's bank depends
    on nothing else: not on the other members or categories, not on the global RNG), so features on
    any device give the same rows. ``name`` (the member's backbone) only labels the log line.
    """
    generator = torch.Generator().manual_seed(seed)
    keep = subsample(features, sampler, percentage, generator)
    log.info("%s: kept %d of %d patch features (%s, %.4g)", name, len(keep), len(features), sampler, percentage)
    return MemoryBank(features[keep], knn_backend)


def _batches(
    images: torch.Tensor | Iterable[torch.Tensor | Image.Image], batch_size: int, transform: ImageTransform | None
) -> Iterable[torch.Tensor]:
    """(B, 3, S, S) batches of ``PatchCore.fit``'s ``images``."""
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    pending: list[torch.Tensor] = []
    for item in images:
        if isinstance(item, Image.Image):
            pending.append(transform.image(item.convert("RGB")))
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
        elif isinstance(item, torch.Tensor):
            yield item
        else:
            raise TypeError(f"fit takes PIL images or (B, 3, S, S) tensors, got a {type(item).__name__}")
    if pending:
        yield torch.stack(pending)


class PatchCore(nn.Module):
    """M PatchCore models that score the same images: images (B, 3, H, W) ImageNet-normalised →
    raw image scores (B, M) and raw segmentations (B, M, H, W).

    Args:
        params: each member's parameters, in the original's terms; all for the same input shape.
        extractors: each member's truncated backbone (members may share one).
        banks: each member's memory bank; None while the model is being fit.
        resize: the shorter image side before the centre crop of ``transform``; default the
            original's for the members' input size (``default_resize``).
        sidecar: what ``save`` writes into our sidecar file besides the versions (weights' sha256,
            how the banks were built).
    """

    def __init__(
        self,
        params: Sequence[PatchCoreParams],
        extractors: Sequence[nn.Module],
        banks: Sequence[MemoryBank] | None = None,
        resize: int | None = None,
        sidecar: dict | None = None,
    ) -> None:
        super().__init__()
        if len(extractors) != len(params) or (banks is not None and len(banks) != len(params)):
            raise ValueError("give one extractor and one memory bank per member")
        shapes = sorted({tuple(p.input_shape) for p in params})
        if len(shapes) != 1:
            raise ValueError(f"the members must share one input shape, got {shapes}")
        self.params = list(params)
        self.extractors = nn.ModuleList(extractors)
        self.banks = nn.ModuleList(banks) if banks is not None else None
        imagesize = self.imagesize
        self.resize = default_resize(imagesize) if resize is None else int(resize)
        if self.resize < imagesize:
            raise ValueError(f"resize must be >= the crop imagesize={imagesize}, got {self.resize}")
        self.sidecar = dict(sidecar or {})
        self._transform = ImageTransform(self.resize, imagesize)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def imagesize(self) -> int:
        """The side of the square images the members take (their ``input_shape``)."""
        return int(self.params[0].input_shape[-1])

    def train(self, mode: bool = True) -> PatchCore:
        """The backbones stay in eval mode: they are frozen, and BatchNorm must use its running
        statistics (a training loop's ``train()`` must not switch it to batch statistics)."""
        super().train(mode)
        for extractor in self.extractors:
            extractor.eval()
        return self

    def __deepcopy__(self, memo: dict) -> PatchCore:
        """A copy in this model's mode. torch.fx rebuilds a copied extractor (a GraphModule) in train
        mode, where BatchNorm would use batch statistics and silently change the copy's scores."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return copied.train(self.training)

    def transform(self, image: Image.Image) -> torch.Tensor:
        """A PIL image → (3, S, S) float32, the tensor ``test`` and ``predict`` make of the same file:
        converted to RGB, resized (shorter side to ``resize``, bilinear), centre-cropped to
        ``imagesize``, ImageNet-normalised (``data.images.ImageTransform``). On the CPU; stack and
        move them where the model is."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"transform takes a PIL image, got a {type(image).__name__}")
        return self._transform.image(image.convert("RGB"))

    def transform_mask(self, mask: Image.Image) -> torch.Tensor:
        """A PIL ground-truth mask → (S, S) uint8 0..255, as ``test`` reads it (converted to L, the
        same resize and crop): the ``masks`` ``metrics.evaluate`` takes (a pixel is anomalous at 255)."""
        if not isinstance(mask, Image.Image):
            raise TypeError(f"transform_mask takes a PIL image, got a {type(mask).__name__}")
        return self._transform.mask(mask.convert("L"))

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
        size = images.shape[-2:]
        outputs = [self.score_features(*self.patch_features(images, m), m, size) for m in range(len(self))]
        return torch.stack([o[0] for o in outputs], dim=1), torch.stack([o[1] for o in outputs], dim=1)

    def score_features(
        self, features: torch.Tensor, grid: tuple[int, int], member: int, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A member's patch features (B*h*w, D) on its (h, w) grid → its raw image scores (B,), raw
        segmentations (B, H, W) of ``size`` (H, W) and patch scores (B, h, w): the mean of each
        patch's k nearest squared distances, their maximum per image, and the upsampled, blurred
        patch scores."""
        if self.banks is None:
            raise RuntimeError("this PatchCore has no memory banks yet: fit it or load a model folder")
        h, w = grid
        patch = self.banks[member].patch_scores(features, self.params[member].anomaly_scorer_num_nn)  # (B*h*w,)
        patch = patch.view(-1, h, w)  # (B, h, w)
        return patch.flatten(1).amax(dim=1), segmentation_maps(patch, tuple(size)), patch  # (B,), (B, H, W), (B, h, w)

    # ------------------------------------------------------------------ building the banks
    @classmethod
    def fit(
        cls,
        images: torch.Tensor | Iterable[torch.Tensor | Image.Image],
        backbones: Sequence[str] = ("wideresnet50",),
        layers: Sequence[str] | Mapping[str, Sequence[str]] = ("layer2", "layer3"),
        percentage: float = 0.1,
        seed: int = 0,
        sampler: SamplerName = "approx_greedy_coreset",
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        patchsize: int = 3,
        anomaly_scorer_num_nn: int = 1,
        backbone_weights: BackboneWeights = None,
        original_bn_warmup: bool = True,
        knn_backend: KnnBackend = "auto",
        imagesize: int | None = None,
        resize: int | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        backbone_cache: Backbones | None = None,
    ) -> PatchCore:
        """A PatchCore whose banks are built from normal training images, without Lightning: the
        banks ``lightning_cli.py fit`` writes for the same images, batches and seed, bit for bit.

        Args:
            images: the training images: PIL images (transformed as ``transform`` does, ``batch_size``
                at a time), a tensor (N, 3, S, S) of transformed images, or an iterable of (B, 3, S, S)
                batches (a DataLoader's, say), each run through the backbones as it comes.
            backbones: one ensemble member per backbone name (``backbones.BACKBONES``).
            layers: layers to extract (dotted module paths), for every backbone, or a mapping
                from backbone name to its layers.
            percentage: fraction of the training patch features kept by the sampler, in (0, 1].
            seed: seeds the sampler's own generator (``build_bank``); the global RNG is untouched.
            sampler: memory bank subsampling (``coreset.SAMPLERS``).
            pretrain_embed_dimension: per-layer feature size after the first adaptive average pooling.
            target_embed_dimension: final patch feature size (the memory bank's dimension).
            patchsize: side of the neighbourhood aggregated around every feature position.
            anomaly_scorer_num_nn: nearest bank vectors whose squared distances are averaged.
            backbone_weights: as the CLI's ``model.backbone_weights``: None for torchvision's
                ImageNet weights from the torch cache, a state_dict file, ``random`` (seeded random
                weights), or a mapping per backbone name.
            original_bn_warmup: replay the original's BatchNorm side effect on each new backbone
                (``backbones.original_bn_warmup``); the original's numbers need it.
            knn_backend: the nearest-neighbour search of the banks (``auto``, ``faiss``, ``torch``).
            imagesize: the crop side; PIL images need it (default 224), a tensor's size must equal it.
            resize: the shorter side before the crop (default: ``default_resize(imagesize)``).
            batch_size: images per backbone pass, for PIL images and a tensor of them.
            device: where the backbones run and the features are kept; the model stays there.
            backbone_cache: backbones already built (``Backbones``), reused instead of
                ``backbone_weights`` and ``original_bn_warmup``.
        """
        if not 0 < percentage <= 1:
            raise ValueError(f"percentage must be in (0, 1], got {percentage}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if imagesize is None:
            imagesize = images.shape[-1] if isinstance(images, torch.Tensor) else 224
        transform = ImageTransform(default_resize(imagesize) if resize is None else resize, imagesize)
        params = member_params(backbones, layers, imagesize, pretrain_embed_dimension, target_embed_dimension,
                               patchsize, anomaly_scorer_num_nn)
        cache = backbone_cache if backbone_cache is not None else Backbones(backbone_weights, original_bn_warmup)
        extractors = [cache.get(p) for p in params]
        model = cls(params, extractors, resize=resize).to(device)
        features: list[list[torch.Tensor]] = [[] for _ in params]
        n_images = 0
        with torch.no_grad():
            for batch in _batches(images, batch_size, transform):
                if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, imagesize, imagesize):
                    raise ValueError(
                        f"fit takes images (B, 3, {imagesize}, {imagesize}), got a batch of shape {tuple(batch.shape)}"
                    )
                batch = batch.to(device)
                for m, parts in enumerate(features):
                    parts.append(model.patch_features(batch, m)[0])  # (B*h*w, D)
                n_images += len(batch)
        if n_images == 0:
            raise ValueError("fit got no training images")
        model.banks = nn.ModuleList(
            build_bank(concat_freeing(parts), sampler, percentage, seed, knn_backend, p.backbone)
            for p, parts in zip(params, features)
        )
        model.sidecar = {
            "weights_sha256": {p.backbone: cache.sha256.get(p.backbone) for p in params},
            "backbone_weights": cache.weights,
            "original_bn_warmup": cache.bn_warmup,
            "sampler": sampler,
            "percentage": percentage,
            "seed": seed,
            "n_train_images": n_images,
            "resize": model.resize,
        }
        return model

    # ------------------------------------------------------------------ the original's folders
    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        imagesize: int | None = None,
        backbones: Backbones | None = None,
        knn_backend: KnnBackend = "auto",
        allow_other_weights: bool = False,
        backbone_weights: BackboneWeights = None,
        original_bn_warmup: bool = True,
        resize: int | None = None,
    ) -> PatchCore:
        """The model saved in ``folder`` (the original's format, single or ensemble).

        Args:
            folder: the model folder (``patchcore_params.pkl`` and ``nnscorer_search_index.faiss``,
                or ``Ensemble-<i>-<n>_`` prefixed pairs).
            imagesize: the crop side of the images it will score; must equal the params'
                ``input_shape`` (default: that size).
            backbones: backbones already built (``Backbones``); default: built from
                ``backbone_weights`` and ``original_bn_warmup``.
            knn_backend: the nearest-neighbour search (``auto``, ``faiss``, ``torch``).
            allow_other_weights: accept backbone weights other than those our sidecar records
                (refused by default).
            backbone_weights: as the CLI's ``model.backbone_weights`` (None: torchvision's ImageNet
                weights from the torch cache, as the CLI resolves them).
            original_bn_warmup: as the CLI's ``model.original_bn_warmup`` (the original's models need it).
            resize: the shorter side before the crop of ``transform``; default the one the sidecar
                records (a folder ``fit`` wrote), else the original's (``default_resize``).
        """
        if backbones is None:
            backbones = Backbones(backbone_weights, original_bn_warmup)
        elif backbone_weights is not None:
            raise ValueError("give backbones (built backbones) or backbone_weights, not both")
        params, extractors, banks = [], [], []
        for files in find_members(folder):
            p = read_params(files.params)
            if imagesize is None:
                imagesize = int(p.input_shape[-1])
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
        sidecar = {k: v for k, v in (read_sidecar(folder) or {}).items() if k not in ("bank_sizes", "versions")}
        if resize is None and isinstance(sidecar.get("resize"), int):
            resize = sidecar["resize"]
        sidecar.update(weights_sha256={p.backbone: backbones.sha256.get(p.backbone) for p in params})
        return cls(params, extractors, banks, resize=resize, sidecar=sidecar)

    def save(self, folder: str | os.PathLike, sidecar: dict | None = None) -> Path:
        """Write the members in the original's folder format, and our JSON sidecar (which the
        original ignores): the model's ``sidecar`` (weights' sha256, how the banks were built, the
        resize), updated with ``sidecar``, with the bank sizes and library versions added."""
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
        record = {**self.sidecar, "resize": self.resize, **(sidecar or {}),
                  "bank_sizes": [len(b) for b in self.banks], "versions": versions}
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
