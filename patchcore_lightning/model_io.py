"""The original's model folder format, read safely and written unchanged.

A folder holds one model (``patchcore_params.pkl`` + ``nnscorer_search_index.faiss``) or an
ensemble of n members whose files carry the prefix ``Ensemble-<i>-<n>_`` (i = 1..n), n being the
number of ``.faiss`` files in the folder. The params pickle is a plain dict; it is read with an
unpickler that admits plain data only, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MemberFiles",
    "ModelFormatError",
    "check_model_folder",
    "PatchCoreParams",
    "find_members",
    "member_prefix",
    "read_index_header",
    "read_params",
    "read_sidecar",
    "safe_unpickle",
    "write_params",
]

PARAMS_FILE = "patchcore_params.pkl"
INDEX_FILE = "nnscorer_search_index.faiss"
SIDECAR_FILE = "patchcore_lightning.json"


class ModelFormatError(ValueError):
    """A model folder or file that does not follow the original's format."""


class _PlainDataUnpickler(pickle.Unpickler):
    # dict, list, tuple, str, bytes, int, float, bool and None are built by opcodes alone;
    # any global (a class or a function, the way a pickle runs code) is refused.
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only plain data is allowed")


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Unpickle plain data (dict/list/tuple/str/int/float/bool/None) from ``path``; nothing else."""
    data = Path(path).read_bytes()
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise ModelFormatError(f"{path}: {err}") from None
    except Exception as err:
        raise ModelFormatError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class PatchCoreParams:
    """What the original stores in ``patchcore_params.pkl`` (its keys in brackets)."""

    backbone: str  # [backbone.name]
    layers: tuple[str, ...]  # [layers_to_extract_from]
    input_shape: tuple[int, int, int]  # [input_shape], (3, H, W)
    pretrain_embed_dimension: int
    target_embed_dimension: int
    patchsize: int
    patchstride: int
    anomaly_scorer_num_nn: int

    def to_original(self) -> dict[str, Any]:
        return {
            "backbone.name": self.backbone,
            "layers_to_extract_from": tuple(self.layers),
            "input_shape": tuple(self.input_shape),
            "pretrain_embed_dimension": self.pretrain_embed_dimension,
            "target_embed_dimension": self.target_embed_dimension,
            "patchsize": self.patchsize,
            "patchstride": self.patchstride,
            "anomaly_scorer_num_nn": self.anomaly_scorer_num_nn,
        }

    @classmethod
    def from_original(cls, raw: Any, source: str | os.PathLike = "<params>") -> PatchCoreParams:
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{source}: expected a dict of PatchCore parameters, got {type(raw).__name__}")
        expected = [
            "backbone.name",
            "layers_to_extract_from",
            "input_shape",
            "pretrain_embed_dimension",
            "target_embed_dimension",
            "patchsize",
            "patchstride",
            "anomaly_scorer_num_nn",
        ]
        missing = [k for k in expected if k not in raw]
        if missing:
            raise ModelFormatError(f"{source}: missing keys {missing} (has {sorted(raw)})")

        def positive_int(key: str) -> int:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelFormatError(f"{source}: {key} must be a positive int, got {value!r}")
            return value

        layers = raw["layers_to_extract_from"]
        if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers:
            raise ModelFormatError(f"{source}: layers_to_extract_from must be a list of layer names, got {layers!r}")
        if not all(isinstance(x, str) for x in layers):
            raise ModelFormatError(f"{source}: layers_to_extract_from must hold strings, got {layers!r}")
        shape = raw["input_shape"]
        if (
            not isinstance(shape, (list, tuple))
            or len(shape) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)
        ):
            raise ModelFormatError(f"{source}: input_shape must be (channels, height, width), got {shape!r}")
        if not isinstance(raw["backbone.name"], str):
            raise ModelFormatError(f"{source}: backbone.name must be a string, got {raw['backbone.name']!r}")
        return cls(
            backbone=raw["backbone.name"],
            layers=tuple(layers),
            input_shape=tuple(shape),
            pretrain_embed_dimension=positive_int("pretrain_embed_dimension"),
            target_embed_dimension=positive_int("target_embed_dimension"),
            patchsize=positive_int("patchsize"),
            patchstride=positive_int("patchstride"),
            anomaly_scorer_num_nn=positive_int("anomaly_scorer_num_nn"),
        )


@dataclass(frozen=True)
class MemberFiles:
    """One member of a model folder: its parameters file and its faiss index file."""

    params: Path
    index: Path


def member_prefix(i: int, n: int) -> str:
    """The file-name prefix of member ``i`` (1-based) of an ``n``-member folder; none for one model."""
    return "" if n == 1 else f"Ensemble-{i}-{n}_"


def find_members(folder: str | os.PathLike) -> list[MemberFiles]:
    """The members of a model folder, in ensemble order (one for a single model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"model folder not found: {folder}")
    n = len([f for f in os.listdir(folder) if f.endswith(".faiss")])
    if n == 0:
        raise ModelFormatError(f"{folder}: no .faiss index (expected {INDEX_FILE} and {PARAMS_FILE})")
    members = []
    for prefix in (member_prefix(i, n) for i in range(1, n + 1)):
        params, index = folder / f"{prefix}{PARAMS_FILE}", folder / f"{prefix}{INDEX_FILE}"
        for path in (params, index):
            if not path.is_file():
                raise ModelFormatError(f"{folder}: missing {path.name} ({n} .faiss files make {n} members)")
        members.append(MemberFiles(params, index))
    return members


def read_params(path: str | os.PathLike) -> PatchCoreParams:
    return PatchCoreParams.from_original(safe_unpickle(path), path)


def write_params(path: str | os.PathLike, params: PatchCoreParams) -> None:
    """Write ``patchcore_params.pkl`` as the original does (a plain pickled dict)."""
    with open(path, "wb") as handle:
        pickle.dump(params.to_original(), handle, pickle.HIGHEST_PROTOCOL)


def read_sidecar(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Our JSON sidecar beside the original files, or None for the original's own folders."""
    path = Path(folder) / SIDECAR_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path}: not valid JSON ({err})") from None


# faiss.write_index of an IndexFlatL2: fourcc "IxF2", d (int32), ntotal (int64), two unused int64,
# is_trained (1 byte), metric_type (int32; 1 = L2), the number of floats (int64), then ntotal * d float32.
_FLAT_L2_FOURCC = b"IxF2"
_FLAT_HEADER = struct.Struct("<4siqqqBiq")


def read_index_header(path: str | os.PathLike) -> tuple[int, int]:
    """``(d, ntotal)`` of a faiss ``IndexFlatL2`` file, from its 45-byte header: the vectors are not
    read, but a file shorter or longer than the header announces is refused (truncated copy)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(_FLAT_HEADER.size)
        size = path.stat().st_size
    except OSError as err:
        raise ModelFormatError(f"cannot read faiss index {path}: {err.strerror or err}") from None
    if len(head) < _FLAT_HEADER.size or head[:4] != _FLAT_L2_FOURCC:
        found = head[:4].decode("ascii", "replace") if head else "an empty file"
        raise ModelFormatError(
            f"{path}: not a faiss IndexFlatL2 file (starts with {found!r}; the memory bank must be an exact L2 index)"
        )
    _, d, ntotal, _, _, _, metric, floats = _FLAT_HEADER.unpack(head)
    expected = _FLAT_HEADER.size + 4 * floats
    if metric != 1 or d < 0 or ntotal < 0 or floats != d * ntotal or size != expected:
        raise ModelFormatError(
            f"{path}: damaged faiss index ({size} bytes; its header announces {ntotal} vectors of dimension {d}, "
            f"{expected} bytes)"
        )
    return d, ntotal


def check_model_folder(folder: str | os.PathLike, imagesize: int) -> list[PatchCoreParams]:
    """Read a model folder as ``PatchCore.from_folder`` does, without its banks: every member's
    files present, params safe and complete, built for ``imagesize``, index headers consistent
    with the params, sidecar valid JSON. Raises ModelFormatError naming the first problem."""
    members = []
    for files in find_members(folder):
        p = read_params(files.params)
        if tuple(p.input_shape[1:]) != (imagesize, imagesize):
            raise ModelFormatError(
                f"{files.params}: the model was built for input_shape {p.input_shape}, but data.imagesize is {imagesize}"
            )
        d, ntotal = read_index_header(files.index)
        if d != p.target_embed_dimension or ntotal == 0:
            raise ModelFormatError(
                f"{files.index}: index holds {ntotal} vectors of dimension {d}; expected a "
                f"non-empty bank of target_embed_dimension={p.target_embed_dimension}"
            )
        if p.anomaly_scorer_num_nn > ntotal:
            raise ModelFormatError(
                f"{files.params}: anomaly_scorer_num_nn={p.anomaly_scorer_num_nn} exceeds the bank size {ntotal}"
            )
        members.append(p)
    read_sidecar(folder)
    return members
