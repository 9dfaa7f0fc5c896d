"""Backbones: names of the original code → torchvision constructors, weight resolution, truncation.

A backbone is cut after the last layer PatchCore needs (torchvision's FX feature extractor), so
nothing downstream of it runs, and it returns a dict ``{layer name: (B, C, h, w)}``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

__all__ = [
    "BACKBONES",
    "BackboneWeights",
    "WeightsError",
    "build_feature_extractor",
    "original_bn_warmup",
    "file_sha256",
    "load_backbone",
    "resolve_weights_path",
]

log = logging.getLogger(__name__)

# name in the original's patchcore_params.pkl → (torchvision constructor, ImageNet weights enum)
BACKBONES: dict[str, tuple[str, str]] = {
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet50": ("resnet50", "ResNet50_Weights"),
    "resnet101": ("resnet101", "ResNet101_Weights"),
    "resnext101": ("resnext101_32x8d", "ResNeXt101_32X8D_Weights"),
    "wideresnet50": ("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
    "wideresnet101": ("wide_resnet101_2", "Wide_ResNet101_2_Weights"),
    "densenet201": ("densenet201", "DenseNet201_Weights"),
}

# What `backbone_weights` may be in a config:
#   None                     torchvision's IMAGENET1K_V1 (the original's pretrained=True), from TORCH_HOME
#   "random"                 seeded random initialisation (demo and tests only; said loudly)
#   "imagenet_or_random"     IMAGENET1K_V1 if already in the torch cache, else random (the offline demo)
#   "<path>"                 a state_dict file, loaded with weights_only=True
#   {backbone name: ...}     one of the above per backbone name, for ensembles of several backbones
BackboneWeights = str | dict[str, str | None] | None


class WeightsError(RuntimeError):
    """Backbone weights missing, unreadable or of another architecture."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unsupported backbone {name!r}; supported: {', '.join(sorted(BACKBONES))}")


def _weights_for(name: str, weights: BackboneWeights) -> str | None:
    if isinstance(weights, Mapping):
        if name not in weights:
            raise WeightsError(
                f"backbone_weights has no entry for backbone {name!r} (it has {sorted(weights)}); "
                f"add '{name}: <path, random or null>'"
            )
        return weights[name]
    return weights


def _imagenet_cache_file(name: str) -> Path:
    """Where torch.hub keeps torchvision's IMAGENET1K_V1 file of ``name``: $TORCH_HOME/hub/checkpoints/."""
    url = getattr(torchvision.models, BACKBONES[name][1]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights_path(name: str, weights: BackboneWeights) -> str | None:
    """The local file the weights of backbone ``name`` come from; None for random weights.

    For ``None`` this is torchvision's IMAGENET1K_V1 file in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/<file>``), downloaded there first if absent and online.
    """
    _check_name(name)
    choice = _weights_for(name, weights)
    if choice == "random":
        return None
    if choice == "imagenet_or_random":
        cached = _imagenet_cache_file(name)
        if cached.is_file():
            return str(cached)
        log.warning("no ImageNet weights for %s at %s: falling back to random weights", name, cached)
        return None
    if choice is not None:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise WeightsError(f"backbone weights file for {name!r} not found: {path}")
        return str(path)
    url = getattr(torchvision.models, BACKBONES[name][1]).IMAGENET1K_V1.url
    cache = _imagenet_cache_file(name)
    if not cache.is_file():
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
        except Exception as err:  # offline, proxy, disk: one clear message
            raise WeightsError(
                f"ImageNet weights of {name!r} not found at {cache} and could not be downloaded "
                f"({type(err).__name__}: {err}). Download {url} on a machine with internet and put it "
                f"there (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}), or set "
                f"backbone_weights to a state_dict file."
            ) from None
    return str(cache)


def load_backbone(name: str, weights: BackboneWeights = None, seed: int = 0) -> tuple[nn.Module, str | None]:
    """The full torchvision model with its weights loaded, in eval mode, frozen.

    Returns the model and the sha256 of the weights file (None for random weights).
    """
    _check_name(name)
    constructor = getattr(torchvision.models, BACKBONES[name][0])
    path = resolve_weights_path(name, weights)
    if path is None:
        # Seeded so that two runs (and two DDP ranks) build the same random network.
        log.warning(
            "!!! backbone %s uses RANDOM weights: scores are NOT those of an ImageNet-pretrained PatchCore !!!",
            name,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = constructor(weights=None)
        digest = None
    else:
        model = constructor(weights=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"cannot read backbone weights {path}: {type(err).__name__}: {err}") from None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"backbone weights {path} are not a state_dict (a mapping of names to tensors)")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise WeightsError(
                f"backbone weights {path} do not fit {name!r} ({BACKBONES[name][0]}): {' '.join(first[:2])[:300]}"
            ) from None
        digest = file_sha256(path)
    model.eval().requires_grad_(False)
    return model, digest


def build_feature_extractor(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """Cut ``model`` after the last of ``layers`` (dotted module paths, e.g. ``features.denseblock2``).

    The result maps images (B, 3, H, W) to ``{layer: (B, C, h, w)}``; modules after the last
    requested layer are not in the traced graph and never run.
    """
    modules = dict(model.named_modules())
    missing = [layer for layer in layers if layer not in modules]
    if missing:
        tops = [n for n in modules if n and "." not in n]
        raise ValueError(f"layers {missing} not found in {type(model).__name__}; its top-level modules are {tops}")
    extractor = create_feature_extractor(model, return_nodes={layer: layer for layer in layers})
    return extractor.eval().requires_grad_(False)


@torch.no_grad()
def original_bn_warmup(extractor: nn.Module, input_shape: Sequence[int]) -> None:
    """Replay the side effect the original has on every backbone it builds.

    The original measures feature dimensions with one forward pass of an all-ones image
    (1, *input_shape) while the backbone is still in train mode. That pass updates the running
    statistics of every BatchNorm up to the last extracted layer (momentum 0.1), and every model
    it saved was built, and is evaluated, with those statistics. Replaying it is what makes our
    scores equal the original's; the extractor is left in eval mode.
    """
    device = next(extractor.parameters()).device
    extractor.train()
    extractor(torch.ones(1, *input_shape, device=device))
    extractor.eval()
