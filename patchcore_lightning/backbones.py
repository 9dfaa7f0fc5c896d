"""Backbones: the original's names → torchvision constructors, weights resolution, truncation.

A backbone is cut after the last layer PatchCore needs (torchvision's FX feature extractor): the
modules after it are not in the graph and never run, and the extractor returns
``{layer name: (B, C, h, w)}``. File weights are memory-mapped where torch can (files written by
``torch.save`` since torch 1.6) and assigned to a network built on the meta device, so the
weights of the dropped layers are never read into memory.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

__all__ = [
    "BACKBONES",
    "BackboneWeights",
    "LayerError",
    "WeightsError",
    "build_feature_extractor",
    "file_sha256",
    "load_backbone",
    "load_feature_extractor",
    "original_bn_warmup",
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

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: the one torch.load can memory-map


class WeightsError(RuntimeError):
    """Backbone weights missing, unreadable or of another architecture."""


class LayerError(ValueError):
    """A layer to extract that the backbone does not have."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _constructor(name: str):
    if name not in BACKBONES:
        raise ValueError(f"unsupported backbone {name!r}; supported: {', '.join(sorted(BACKBONES))}")
    return getattr(torchvision.models, BACKBONES[name][0])


def _weights_for(name: str, weights: BackboneWeights) -> str | None:
    if isinstance(weights, Mapping):
        if name not in weights:
            raise WeightsError(
                f"backbone_weights has no entry for backbone {name!r} (it has {sorted(weights)}); "
                f"add '{name}: <path, random or null>'"
            )
        return weights[name]
    return weights


def _imagenet_url(name: str) -> str:
    return getattr(torchvision.models, BACKBONES[name][1]).IMAGENET1K_V1.url


def _imagenet_cache_file(name: str) -> Path:
    """Where torch.hub keeps torchvision's IMAGENET1K_V1 file of ``name``: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_imagenet_url(name))


def resolve_weights_path(name: str, weights: BackboneWeights) -> str | None:
    """The local file the weights of backbone ``name`` come from; None for random weights.

    For ``None`` this is torchvision's IMAGENET1K_V1 file in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/<file>``), downloaded there first if absent and online.
    """
    _constructor(name)
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
    cache = _imagenet_cache_file(name)
    if not cache.is_file():
        url = _imagenet_url(name)
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


def _read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """The state_dict in ``path``: memory-mapped where the format allows, never unpickling code."""
    with open(path, "rb") as handle:
        mappable = handle.read(4) == _ZIP_MAGIC
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except Exception as err:
        raise WeightsError(f"backbone weights {path} are not a state_dict: torch.load cannot read it ({_reason(err)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"backbone weights {path} are not a state_dict (a mapping of names to tensors)")
    return state


def _reason(err: Exception) -> str:
    """The cause in torch.load's message, in a few words (its weights_only hint is not one)."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?: was not an allowed global|\.?\n|$)", str(err))
    if found:
        return found.group(1)[:120]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:100]}" if lines else type(err).__name__


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], path: str, name: str) -> None:
    """One line naming the file, the backbone, how many entries do not fit, and two of them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or misshapen:
        examples = ", ".join((missing + unexpected + misshapen)[:2])
        raise WeightsError(
            f"backbone weights {path} do not fit {name!r} ({BACKBONES[name][0]}): {len(missing)} keys missing, "
            f"{len(unexpected)} unexpected, {len(misshapen)} of another shape (e.g. {examples})"
        )


def _build(name: str, weights: BackboneWeights, seed: int) -> tuple[nn.Module, str | None]:
    """The full network with its weights (file weights assigned, not copied) and the file's sha256."""
    constructor = _constructor(name)
    path = resolve_weights_path(name, weights)
    if path is None:
        log.warning(
            "!!! backbone %s uses RANDOM weights: scores are NOT those of an ImageNet-pretrained PatchCore !!!", name
        )
        with torch.random.fork_rng(devices=[]):  # the same network in every run and on every rank
            torch.manual_seed(seed)
            return constructor(weights=None), None
    state = _read_state_dict(path)
    with torch.device("meta"):
        model = constructor(weights=None)
    _check_keys(model, state, path, name)
    # A file without BatchNorm counters (saved before torch 0.4.1) loads as torch's loader fills them in.
    counters = {k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if k not in state}
    model.load_state_dict({**state, **counters}, assign=True)
    return model.float(), file_sha256(path)  # a float64 or half file computes in float32, as the original


def load_backbone(name: str, weights: BackboneWeights = None, seed: int = 0) -> tuple[nn.Module, str | None]:
    """The full torchvision model with its weights, in eval mode, frozen; and the sha256 of the
    weights file (None for random weights). PatchCore uses ``load_feature_extractor``."""
    model, digest = _build(name, weights, seed)
    return model.eval().requires_grad_(False), digest


def load_feature_extractor(
    name: str, layers: Sequence[str], weights: BackboneWeights = None, seed: int = 0
) -> tuple[nn.Module, str | None]:
    """``build_feature_extractor(load_backbone(name, weights, seed)[0], layers)`` and the weights' sha256.

    With file weights the layers after the last of ``layers`` are never read: their tensors stay
    memory-mapped (or, for torch's legacy format, are freed with the rest of the file's copy).
    """
    model, digest = _build(name, weights, seed)
    extractor = build_feature_extractor(model, layers)
    del model
    gc.collect()  # the FX tracer holds the full model in a reference cycle: drop the cut layers now
    return extractor, digest


def build_feature_extractor(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """Cut ``model`` after the last of ``layers`` (dotted module paths, e.g. ``features.denseblock2``).

    The result maps images (B, 3, H, W) to ``{layer: (B, C, h, w)}``; modules after the last
    requested layer are not in the traced graph and never run.
    """
    modules = dict(model.named_modules())
    missing = [layer for layer in layers if layer not in modules]
    if missing:
        tops = [n for n in modules if n and "." not in n]
        raise LayerError(f"layers {missing} not found in {type(model).__name__}; its top-level modules are {tops}")
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
