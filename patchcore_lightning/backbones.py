"""Backbones: names of the original code → torchvision constructors, weight resolution, truncation.

A backbone is cut after the last layer PatchCore needs (torchvision's FX feature extractor), so
nothing downstream of it runs, and it returns a dict ``{layer name: (B, C, h, w)}``.

``load_feature_extractor`` also never materialises what comes after the last layer (layer4 and
fc are 64% of a WideResNet50's 263 MB): the network is built on the ``meta`` device and only the
kept modules get memory. File weights are memory-mapped (or, in torch's legacy format, read entry
by entry) and assigned, never copied; random weights replay torchvision's seeded initialisation op
by op, so the kept layers get exactly the values a full build gives them.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
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


def _warn_random(name: str) -> None:
    log.warning(
        "!!! backbone %s uses RANDOM weights: scores are NOT those of an ImageNet-pretrained PatchCore !!!",
        name,
    )


def _build_seeded(constructor: Callable[..., nn.Module], seed: int) -> nn.Module:
    # Seeded so that two runs (and two DDP ranks) build the same random network; the global RNG
    # is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return constructor(weights=None)


# The legacy format (torch.save before 1.6, and torchvision's oldest ImageNet files, e.g.
# wide_resnet50_2-95faca4d.pth): four pickles (magic number, protocol, system info, the object
# with storages as persistent ids), the sorted list of storage keys, then each storage in that
# order as an int64 element count and its raw little-endian bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")


@dataclass(frozen=True)
class _LegacyTensor:
    key: str  # its storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _legacy_tensor(key, storage_offset, size, stride, *_) -> _LegacyTensor:  # torch._utils._rebuild_tensor_v2
    return _LegacyTensor(key, storage_offset, tuple(size), tuple(stride))


class _LegacyIndex(pickle.Unpickler):
    """The object pickle of a legacy file with tensors as records of where their data lie; no other globals."""

    def __init__(self, handle) -> None:
        super().__init__(handle)
        self.storages: dict[str, tuple[torch.dtype, int]] = {}  # key → (dtype, element count)

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _legacy_tensor
        if module == "torch" and name in _LEGACY_STORAGES:
            return _LEGACY_STORAGES[name]
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel, view = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype) or view is not None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        self.storages[key] = (dtype, numel)
        return key


_Reader = Callable[[Iterable[str]], dict[str, torch.Tensor]]  # entry names → their tensors


def _index_legacy(path: str) -> tuple[dict[str, torch.Tensor], _Reader] | None:
    """A legacy-format state_dict as meta tensors, and a reader of named entries; None if not one we can index."""
    try:
        with open(path, "rb") as handle:
            if _PlainData(handle).load() != _LEGACY_MAGIC or _PlainData(handle).load() != 1001:
                return None
            if not _PlainData(handle).load().get("little_endian") or sys.byteorder != "little":
                return None
            index = _LegacyIndex(handle)
            obj = index.load()
            keys = _PlainData(handle).load()
            offset = handle.tell()
    except Exception:  # noqa: BLE001  (anything unexpected: torch.load reads it, or says why not)
        return None
    if not isinstance(obj, Mapping) or not all(isinstance(v, _LegacyTensor) for v in obj.values()):
        return None
    data: dict[str, int] = {}  # storage key → file offset of its bytes
    for key in keys:
        dtype, numel = index.storages[key]
        data[key] = offset + 8
        offset += 8 + numel * dtype.itemsize
    if offset != os.path.getsize(path):
        return None
    meta = collections.OrderedDict(
        (name, torch.empty_strided(t.size, t.stride, dtype=index.storages[t.key][0], device="meta"))
        for name, t in obj.items()
    )
    if hasattr(obj, "_metadata"):  # module versions, which load_state_dict reads (as torch.load keeps them)
        meta._metadata = obj._metadata

    def read(names: Iterable[str]) -> dict[str, torch.Tensor]:
        storages: dict[str, torch.Tensor] = {}
        out = {}
        with open(path, "rb") as handle:
            for name in names:
                t = obj[name]
                if t.key not in storages:
                    dtype, numel = index.storages[t.key]
                    storage = torch.empty(numel, dtype=dtype)  # (numel,)
                    handle.seek(data[t.key])
                    if handle.readinto(storage.view(torch.uint8).numpy()) != numel * dtype.itemsize:
                        raise WeightsError(f"backbone weights {path}: truncated file")
                    storages[t.key] = storage
                out[name] = storages[t.key].as_strided(t.size, t.stride, t.storage_offset)
        return out

    return meta, read


def _open_state_dict(path: str) -> tuple[Mapping[str, torch.Tensor], _Reader, bool]:
    """The state_dict in ``path`` without reading its data, a reader of the entries one names, and
    whether the file was read whole nevertheless.

    Only what is read takes memory: a zip-format file (torch.save since 1.6) is memory-mapped
    (its tensors hold no memory until used); a legacy-format file is indexed (its entries are meta
    tensors; the reader reads the named ones). Any other file is read whole by torch.load.
    """
    with open(path, "rb") as handle:
        mappable = handle.read(4) == b"PK\x03\x04"  # torch's zip format
    if not mappable:
        indexed = _index_legacy(path)
        if indexed is not None:
            return *indexed, False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except Exception as err:
        raise WeightsError(f"cannot read backbone weights {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"backbone weights {path} are not a state_dict (a mapping of names to tensors)")
    return state, lambda names: {name: state[name] for name in names}, not mappable


def _conform(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries of another dtype than the model's, or not contiguous, converted as copying them into it would."""
    return {
        k: v if k not in reference or (v.dtype == reference[k].dtype and v.is_contiguous())
        else v.to(reference[k].dtype).contiguous()
        for k, v in state.items()
    }


def _load_weights(model: nn.Module, path: str, name: str, keep: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``keep(model)`` (the model itself, or a part of it sharing its modules) with the weights of ``path``.

    ``model`` is built on the meta device. The file's entries are checked against the whole model
    as ``load_state_dict(strict=True)`` checks them (missing, unexpected, misshapen entries: a
    WeightsError); only those of the kept part are then read, and assigned without a copy.
    """
    state, read, whole = _open_state_dict(path)
    reference = model.state_dict()  # meta tensors: dtypes and shapes
    try:
        model.load_state_dict(_conform(state, reference), strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise WeightsError(
            f"backbone weights {path} do not fit {name!r} ({BACKBONES[name][0]}): {' '.join(first[:2])[:300]}"
        ) from None
    in_file = set(state)
    del state
    kept = keep(model)
    # (an entry load_state_dict filled in, e.g. num_batches_tracked of an old file, is no file entry)
    names = [n for n in kept.state_dict() if n in in_file]
    kept.load_state_dict(_conform(read(names), reference), strict=False, assign=True)
    assert not any(t.is_meta for _, t in _tensors(kept)), f"{name}: a kept tensor has no weights"
    if whole and kept is not model:
        del model
        gc.collect()  # the FX tracer holds the model in a reference cycle: free the dropped layers now
    return kept


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def load_backbone(name: str, weights: BackboneWeights = None, seed: int = 0) -> tuple[nn.Module, str | None]:
    """The full torchvision model with its weights loaded, in eval mode, frozen.

    Returns the model and the sha256 of the weights file (None for random weights). PatchCore
    uses ``load_feature_extractor``, which leaves out the modules after the last layer.
    """
    _check_name(name)
    constructor = getattr(torchvision.models, BACKBONES[name][0])
    path = resolve_weights_path(name, weights)
    if path is None:
        _warn_random(name)
        model = _build_seeded(constructor, seed)
        digest = None
    else:
        with torch.device("meta"):
            model = constructor(weights=None)
        model = _load_weights(model, path, name, keep=lambda m: m)
        digest = file_sha256(path)
    model.eval().requires_grad_(False)
    return model, digest


def load_feature_extractor(
    name: str, layers: Sequence[str], weights: BackboneWeights = None, seed: int = 0
) -> tuple[nn.Module, str | None]:
    """``build_feature_extractor(load_backbone(name, weights, seed)[0], layers)``, same weights, same
    outputs, without ever giving memory to the modules after the last of ``layers``.

    File weights are assigned to a network built on the meta device, and only the kept layers'
    entries are read: a zip-format file is memory-mapped, a legacy-format one (as torchvision's
    WideResNet50 ImageNet file is) indexed and read entry by entry. Random weights are those of
    torchvision's constructor after ``torch.manual_seed(seed)``, bit for bit: see
    ``_build_seeded_prefix``. Returns the extractor (eval mode, frozen) and the sha256 of the
    weights file (None for random weights).
    """
    _check_name(name)
    constructor = getattr(torchvision.models, BACKBONES[name][0])
    path = resolve_weights_path(name, weights)
    if path is None:
        _warn_random(name)
        return _build_seeded_prefix(constructor, layers, seed), None
    with torch.device("meta"):
        model = constructor(weights=None)
    extractor = _load_weights(model, path, name, keep=lambda m: build_feature_extractor(m, layers))
    return extractor, file_sha256(path)


# --------------------------------------------------------------------------- seeded random prefix
# torchvision's constructors draw every layer's initial weights from the global RNG in
# construction order (each Conv2d/Linear draws when built, then the network re-draws its convs in
# module order), so the values of layer1..3 depend on how many numbers layer4 and fc drew before.
# We build the network twice: once on the meta device, recording the sequence of tensor ops and
# which of them create the tensors of modules after the last layer (the "dropped" tensors); then
# on the CPU under the same seed, where every op on a dropped tensor that may draw random numbers
# runs on a throw-away tensor of the same size and strides (so the RNG advances exactly as in a
# full build) and the module keeps a meta tensor. The transient is one buffer the size of the
# largest dropped tensor (36 MB for WideResNet50's layer4), not the dropped layers (168 MB).
# Anything unexpected (another op sequence, a kept tensor computed from a dropped one) falls back
# to the full build: same numbers, more memory.


class _Unreplayable(RuntimeError):
    """The CPU build did not follow the meta build's recorded op sequence."""


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _flat_tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _is_view(func) -> bool:
    """An op that neither writes nor creates memory (detach, alias, lift_fresh): it draws no random number."""
    schema = func._schema
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return not writes and bool(schema.returns) and all(r.alias_info is not None for r in schema.returns)


class _RecordMetaBuild(TorchDispatchMode):
    """Records every non-view op and the storages it creates (run under ``torch.device("meta")``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []  # the op overloads, in order
        self.created: list[set[int]] = []  # storage keys each op created
        self._seen: set[int] = set()
        self._alive: list = []  # keeps every tensor alive, so that no storage key is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view(func):
            return out
        inputs = {_storage_key(t) for t in _flat_tensors((args, kwargs))}
        created = {_storage_key(t) for t in _flat_tensors(out)} - inputs - self._seen
        self._seen |= inputs | created
        self._alive.append(out)
        self.ops.append(func)
        self.created.append(created)
        return out


# Ops that draw no random number: on a dropped tensor they run on the meta device only.
_NO_DRAWS = frozenset({
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.zeros.default,
    torch.ops.aten.ones.default,
    torch.ops.aten.full.default,
    torch.ops.aten.fill_.Scalar,
    torch.ops.aten.zero_.default,
})


class _SkipDropped(TorchDispatchMode):
    """Replays a recorded build on the CPU, giving the dropped tensors no memory (meta tensors).

    An op on dropped tensors that may draw random numbers runs on stand-ins of the same size and
    strides, views of one ``scratch`` buffer (their values are never read), so that the generator
    advances exactly as in a full build.
    """

    def __init__(self, ops: list, dropped: set[int], scratch_bytes: int) -> None:
        super().__init__()
        self.ops, self.dropped, self.count = ops, dropped, 0
        self.scratch = torch.empty(scratch_bytes, dtype=torch.uint8).untyped_storage()

    def _stand_in(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            return t
        if t.untyped_storage().nbytes() > self.scratch.nbytes():
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
        return torch.empty(0, dtype=t.dtype).set_(self.scratch, t.storage_offset(), t.shape, t.stride())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_view(func):
            return func(*args, **kwargs)
        i = self.count
        self.count += 1
        if i >= len(self.ops) or func is not self.ops[i]:
            expected = self.ops[i] if i < len(self.ops) else "the end"
            raise _Unreplayable(f"op {i} is {func}, the meta build ran {expected}")
        if i not in self.dropped and not any(t.is_meta for t in _flat_tensors((args, kwargs))):
            return func(*args, **kwargs)
        for arg, value in zip(func._schema.arguments, args):
            written = arg.alias_info is not None and arg.alias_info.is_write
            if written and isinstance(value, torch.Tensor) and not value.is_meta:
                raise _Unreplayable(f"{func} writes a kept tensor from a dropped one")
        if func not in _NO_DRAWS:  # the same draws, on throw-away memory
            stand_in_args, stand_in_kwargs = tree_map_only(torch.Tensor, self._stand_in, (args, kwargs))
            func(*stand_in_args, **stand_in_kwargs)
        meta_args = tree_map_only(torch.Tensor, lambda t: t.to("meta"), args)
        meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), kwargs)
        if any(a.name == "device" for a in func._schema.arguments):
            meta_kwargs["device"] = torch.device("meta")
        return func(*meta_args, **meta_kwargs)


def _build_seeded_prefix(constructor: Callable[..., nn.Module], layers: Sequence[str], seed: int) -> nn.Module:
    """The extractor of ``_build_seeded(constructor, seed)`` cut after ``layers``, built without the rest."""
    recorder = _RecordMetaBuild()
    with torch.device("meta"), recorder:
        skeleton = constructor(weights=None)
    kept = {_storage_key(t) for _, t in _tensors(build_feature_extractor(skeleton, layers))}
    dropped_tensors = [t for _, t in _tensors(skeleton) if _storage_key(t) not in kept]
    dropped_keys = {_storage_key(t) for t in dropped_tensors}
    scratch_bytes = max((t.untyped_storage().nbytes() for t in dropped_tensors), default=0)
    ops = recorder.ops
    dropped = {i for i, created in enumerate(recorder.created) if created & dropped_keys}
    mixed = any(recorder.created[i] & kept for i in dropped)
    del skeleton, recorder, dropped_tensors
    try:
        if mixed:
            raise _Unreplayable("one op creates a kept and a dropped tensor")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with _SkipDropped(ops, dropped, scratch_bytes) as replay:
                model = constructor(weights=None)
        if replay.count != len(ops):
            raise _Unreplayable(f"the CPU build ran {replay.count} ops, the meta build {len(ops)}")
        extractor = build_feature_extractor(model, layers)
        if any(t.is_meta for _, t in _tensors(extractor)):
            raise _Unreplayable("a kept tensor was computed from a dropped one")
        return extractor
    except _Unreplayable as err:
        log.info("building all of %s, then cutting it (%s)", constructor.__name__, err)
        extractor = build_feature_extractor(_build_seeded(constructor, seed), layers)
        gc.collect()  # the FX tracer holds the model in a reference cycle: free the dropped layers now
        return extractor


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
