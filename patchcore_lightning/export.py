"""A fitted PatchCore as one ONNX file that gives ``predict``'s raw scores without torch.

Notation: B images of H×W pixels, M members, (h, w) a member's patch grid, N = h*w patches per
image, D a member's bank dimension, R its bank rows, k its nearest neighbours.

The graph takes the pixels ``test`` feeds the backbone before its normalisation: uint8
(B, H, W, 3) RGB, already resized and centre-cropped (metadata.json states how); B is dynamic.
It returns

- ``score`` (B,): the mean of the members' raw image scores (predict's ``score``),
- ``member_scores`` (B, M): each member's raw image score,
- ``segmentation`` (B, H, W): the mean of the members' raw maps, blurred (predict's heatmaps).

Two parts, joined into one file:

- Features (exported from torch): normalisation, the truncated backbones, and the locally aware
  patch features. ``embed``'s unfold-then-adaptive-pool is linear in the layer maps, so it is
  written as convolutions: pooling a p×p block of C channels to ``pretrain_dim`` is a grouped
  p×p convolution whose weights are 1/width inside each pooling window (the windows never cross
  a group of gcd(C, pretrain_dim) channels), and the stacking of the layers pooled to
  ``target_dim`` a grouped 1×1 convolution. A later layer is pooled on its own grid and then
  resized (bilinear) to the first layer's: pooling and resizing commute in exact arithmetic, and
  the resize then touches ``pretrain_dim`` maps instead of C*p*p. The features differ from
  ``embed``'s by float32 rounding (sums in another order).
- Search and maps (written here as ONNX nodes), as ``MemoryBank.search``: the k + RERANK_EXTRA
  candidates nearest by ``|x|² + |y|² - 2 x·y`` (faiss's formula) to the bank in chunks of rows,
  a running top-k of (distance, row) inside an ONNX ``Loop``: one (B*N, chunk) block is alive at
  a time, so memory grows with the batch and not with the bank; at batch 1 no block passes
  ``block_bytes``. Then the candidates' distances as ``Σ (x - y)²``, one candidate at a time (a
  (B*N, D) block: 3 MiB per 224² WideResNet50 image), which is free of the formula's cancellation,
  the mean of the k smallest per patch, the image score (the
  largest patch score), and the map: each member's patch scores resized bilinearly to H×W, their
  mean, and scipy's σ=4 Gaussian with 'reflect' borders (two 1-D convolutions over gathered,
  reflected indices), as ``anomaly_map.segmentation_maps``.

Only standard operators of opset 17, which ONNX Runtime's CPU provider and OpenVINO both run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .anomaly_map import gaussian_kernel1d
from .data.images import IMAGENET_MEAN, IMAGENET_STD
from .embedding import patch_grid
from .memory_bank import RERANK_EXTRA
from .model import PatchCore

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "ExportFormat",
    "ExportOptions",
    "OPENVINO_CONFIG",
    "export_folders",
    "export_model",
    "pooling_conv_weight",
    "to_openvino",
]

log = logging.getLogger(__name__)

# metadata.json's ``format_version``: a runtime refuses a larger one than it knows.
EXPORT_FORMAT_VERSION = 1
OPSET = 17
# The graph's names, which metadata.json repeats and the runtime checks.
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "member_scores", "segmentation")
# A (B*N, chunk) float32 distance block at batch 1, and a chunk of bank rows, stay below this.
DEFAULT_BLOCK_BYTES = 64 << 20
# Above this many bytes of initializers they go to model.onnx.data beside the graph: ONNX's protobuf
# cannot pass 2 GiB, and ONNX Runtime memory-maps external data where it copies embedded tensors out
# of the parsed file (a 200,000 x 1024 bank: 1.64 GB peak embedded, 1.12 GB beside; benchmarks/README.md).
EXTERNAL_DATA_ABOVE = 512 << 20
# OpenVINO's CPU plugin runs in bf16 by default on CPUs with AMX / AVX512-BF16, which moves the
# scores by ~1e-1; compiled with this it gives predict's numbers. metadata.json carries it.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

ExportFormat = Literal["onnx", "openvino"]


@dataclass
class ExportOptions:
    """``export``'s settings.

    Args:
        format: ``onnx`` writes model.onnx; ``openvino`` also converts it to OpenVINO IR
            (model.xml + model.bin, weights kept in f32; needs the ``openvino`` extra).
        block_mib: the largest distance block (and chunk of bank rows) the graph's search holds
            at batch 1, in MiB; at most 256.
    """

    format: ExportFormat = "onnx"
    block_mib: int = DEFAULT_BLOCK_BYTES >> 20


# ---------------------------------------------------------------------------------------- features
def pooling_conv_weight(channels: int, patchsize: int, size: int) -> tuple[torch.Tensor, int]:
    """``adaptive_avg_pool1d`` of every patch's flattened (C, p, p) block to ``size`` values, as the
    weight of a grouped p×p convolution: ((size, C/G, p, p) weight, G groups), G = gcd(C, size).

    Output i averages block entries [floor(i*n/size), ceil((i+1)*n/size)) of n = C*p*p; when G
    divides both C and size, the windows of the outputs of group q lie inside the channels of
    group q, and every group has the same pattern.
    """
    groups = math.gcd(channels, size)
    n = channels * patchsize * patchsize
    per_group_in, per_group_out = channels // groups, size // groups
    pattern = torch.zeros(per_group_out, per_group_in * patchsize * patchsize, dtype=torch.float64)
    for r in range(per_group_out):
        start, end = (r * n) // size, -((-(r + 1) * n) // size)
        pattern[r, start:end] = 1.0 / (end - start)
    weight = pattern.to(torch.float32).view(per_group_out, per_group_in, patchsize, patchsize)
    return weight.repeat(groups, 1, 1, 1), groups  # (size, C/G, p, p)


class _Pool(nn.Module):
    """A grouped convolution with fixed weights: one layer's pooled patch blocks. (B, C, h, w) → (B, size, h', w')"""

    def __init__(self, channels: int, patchsize: int, stride: int, size: int) -> None:
        super().__init__()
        weight, self.groups = pooling_conv_weight(channels, patchsize, size)
        self.register_buffer("weight", weight)
        self.stride, self.padding = stride, (patchsize - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding, groups=self.groups)


class _FeatureGraph(nn.Module):
    """uint8 images (B, H, W, 3) → every member's patch features (B, N, D): the part exported from torch."""

    def __init__(self, model: PatchCore, shapes: Sequence[Sequence[tuple[int, int, int]]]) -> None:
        super().__init__()
        layer_channels = [[c for c, _, _ in member] for member in shapes]
        # each layer's pooled grid, and the member's patch grid (its first layer's): fixed by the input size
        self.layer_grids = [[_pooled_grid(h, w, p) for _, h, w in member] for member, p in zip(shapes, model.params)]
        self.grids = [grids[0] for grids in self.layer_grids]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        unique: list[nn.Module] = []
        self.extractor_of: list[int] = []  # member → index into ``extractors`` (members may share one)
        for extractor in model.extractors:
            if not any(extractor is e for e in unique):
                unique.append(extractor)
            self.extractor_of.append(next(i for i, e in enumerate(unique) if e is extractor))
        self.extractors = nn.ModuleList(unique)
        self.layers = [list(p.layers) for p in model.params]
        self.pools = nn.ModuleList()
        self.final = nn.ModuleList()
        for p, channels in zip(model.params, layer_channels):
            self.pools.append(nn.ModuleList(
                _Pool(c, p.patchsize, p.patchstride, p.pretrain_embed_dimension) for c in channels
            ))
            self.final.append(_Pool(len(channels) * p.pretrain_embed_dimension, 1, 1, p.target_embed_dimension))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        # test's ToTensor + Normalize, in their order: /255, then (x - mean) / std
        x = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255)  # (B, 3, H, W)
        x = (x - self.mean) / self.std
        maps = [None] * len(self.extractors)
        out = []
        for m, layers in enumerate(self.layers):
            e = self.extractor_of[m]
            if maps[e] is None:
                maps[e] = self.extractors[e](x)  # {layer: (B, C, h_l, w_l)}
            pooled = [pool(maps[e][layer]) for pool, layer in zip(self.pools[m], layers)]  # (B, pretrain, h_l, w_l)
            grid = self.grids[m]
            pooled = [
                q if size == grid else F.interpolate(q, size=grid, mode="bilinear", align_corners=False)
                for q, size in zip(pooled, self.layer_grids[m])
            ]  # (B, pretrain, h, w) each: a later layer resized to the first layer's grid
            feats = self.final[m](torch.cat(pooled, dim=1))  # (B, D, h, w): per patch, layer after layer, pooled
            out.append(feats.flatten(2).transpose(1, 2))  # (B, N, D), patches row-major
        return out


def _pooled_grid(h: int, w: int, p) -> tuple[int, int]:
    return patch_grid(h, p.patchsize, p.patchstride), patch_grid(w, p.patchsize, p.patchstride)


def _layer_shapes(model: PatchCore) -> list[list[tuple[int, int, int]]]:
    """Each member's layers' (C, h_l, w_l), from one pass of a zero image."""
    shapes = []
    for p, extractor in zip(model.params, model.extractors):
        with torch.no_grad():
            maps = extractor(torch.zeros(1, *p.input_shape))  # {layer: (1, C, h_l, w_l)}
        shapes.append([tuple(int(s) for s in maps[layer].shape[1:]) for layer in p.layers])
    return shapes


def _export_features(model: PatchCore, path: Path) -> list[tuple[int, int]]:
    """The feature part as an ONNX file at ``path``; returns each member's patch grid (h, w)."""
    import onnx  # the optional ``onnx`` extra

    graph = _FeatureGraph(model, _layer_shapes(model)).eval()
    _, H, W = model.params[0].input_shape
    example = torch.zeros(1, H, W, 3, dtype=torch.uint8)
    names = [f"features{m}" for m in range(len(model))]
    with warnings.catch_warnings():
        # The TorchScript-based exporter: the dynamo one fixes the batch dimension of this graph.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))
    return graph.grids


# ---------------------------------------------------------------------------------------- search and maps
class _Builder:
    """Appends nodes and initializers to an ONNX graph under unique names."""

    def __init__(self, graph, prefix: str) -> None:
        self.graph, self.prefix, self.count = graph, prefix, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, n_out: int = 1, **attrs) -> str | list[str]:
        from onnx import helper

        outs = [self.name(hint or op.lower()) for _ in range(n_out)]
        self.graph.node.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs


def _chunk_rows(n_queries: int, dim: int, rows: int, k: int, block_bytes: int) -> int:
    """Bank rows per chunk: the (n_queries, chunk) distances and the (chunk, D) rows each within ``block_bytes``."""
    elems = block_bytes // 4
    return max(k, min(rows, elems // max(n_queries, dim, 1)))


def _search_nodes(
    b: _Builder, queries: str, bank: np.ndarray, k: int, n_queries: int, block_bytes: int
) -> str:
    """Nodes of the k-NN search of ``queries`` (Q, D) against ``bank`` (R, D): the mean of the k
    smallest squared L2 distances per query, (Q,). Q = B*N is dynamic; chunks are sized for B = 1.

    As ``MemoryBank.search``: the k + RERANK_EXTRA candidates nearest by ``|x|² + |y|² - 2 x·y`` (a
    float32 GEMM per chunk of bank rows, whose rounding grows with the norms and depends on the
    kernel), then their distances computed as ``Σ (x - y)²`` in float32 (no cancellation: within
    (D + 2) u of the exact ones whatever the order of the sum), the k smallest of those averaged."""
    from onnx import TensorProto, helper

    R, D = bank.shape
    c = min(k + RERANK_EXTRA, R)  # candidates
    chunk = _chunk_rows(n_queries, D, R, c, block_bytes)
    y = b.const(np.ascontiguousarray(bank, dtype=np.float32), "bank")  # (R, D)
    y_sq = b.const((bank.astype(np.float64) ** 2).sum(axis=1).astype(np.float32), "bank_sq")  # (R,)
    x_sq = b.node("ReduceSumSquare", [queries], "x_sq", axes=[1], keepdims=1)  # (Q, 1)

    def block(sub: _Builder, rows: str, rows_sq: str, start: str | None, best: tuple[str, str] | None) -> tuple[str, str]:
        # (|y|² - 2 x·y) + |x|²: the (Q, chunk) block; its c nearest (global row indices) merged into ``best``
        d = sub.node("Gemm", [queries, rows, rows_sq], "xy", alpha=-2.0, beta=1.0, transB=1)  # (Q, chunk)
        d = sub.node("Add", [d, x_sq], "d")  # (Q, chunk)
        width = sub.node("Slice", [sub.node("Shape", [d]), sub.const(np.array([1])), sub.const(np.array([2]))])
        cc = sub.node("Min", [width, sub.const(np.array([c], dtype=np.int64))], "cc")  # (1,) a chunk may hold fewer than c
        near, rows_at = sub.node("TopK", [d, cc], "near", n_out=2, axis=1, largest=0, sorted=1)  # (Q, cc) each
        if start is not None:
            rows_at = sub.node("Add", [rows_at, start], "rows_at")  # chunk rows -> bank rows
        if best is None:
            return near, rows_at
        both = sub.node("Concat", [best[0], near], "both", axis=1)  # (Q, c + cc)
        both_at = sub.node("Concat", [best[1], rows_at], "both_at", axis=1)
        kept, where = sub.node("TopK", [both, sub.const(np.array([c], dtype=np.int64))], "best", n_out=2, axis=1,
                               largest=0, sorted=1)  # (Q, c)
        return kept, sub.node("GatherElements", [both_at, where], "best_at", axis=1)

    if chunk >= R:
        _, candidates = block(b, y, y_sq, None, None)
    else:
        # A Loop over ceil(R / chunk) chunks; the state is the c nearest by the formula so far and
        # their bank rows, (Q, c) each.
        n_chunks = -(-R // chunk)
        q_rows = b.node("Slice", [b.node("Shape", [queries]), b.const(np.array([0])), b.const(np.array([1]))])
        shape = b.node("Concat", [q_rows, b.const(np.array([c], dtype=np.int64))], axis=0)
        init = b.node("ConstantOfShape", [shape], "inf", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [np.inf]))
        init_at = b.node("ConstantOfShape", [shape], "zero", value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
        body = helper.make_graph([], "bank_chunks", [], [])
        sub = _Builder(body, b.prefix + "loop_")
        it, cond, state, state_at = sub.name("i"), sub.name("cond"), sub.name("best_in"), sub.name("best_at_in")
        start = sub.node("Mul", [sub.node("Unsqueeze", [it, sub.const(np.array([0]))]),
                                 sub.const(np.array([chunk], dtype=np.int64))], "start")  # (1,)
        end = sub.node("Add", [start, sub.const(np.array([chunk], dtype=np.int64))], "end")
        axis0 = sub.const(np.array([0]))
        rows = sub.node("Slice", [y, start, end, axis0], "rows")  # (chunk, D); the last one may be shorter
        rows_sq = sub.node("Slice", [y_sq, start, end, axis0], "rows_sq")  # (chunk,)
        best_out, best_at_out = block(sub, rows, rows_sq, start, (state, state_at))
        cond_out = sub.node("Identity", [cond], "cond_out")
        body.input.extend([
            helper.make_tensor_value_info(it, TensorProto.INT64, []),
            helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
            helper.make_tensor_value_info(state, TensorProto.FLOAT, ["Q", c]),
            helper.make_tensor_value_info(state_at, TensorProto.INT64, ["Q", c]),
        ])
        body.output.extend([
            helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
            helper.make_tensor_value_info(best_out, TensorProto.FLOAT, ["Q", c]),
            helper.make_tensor_value_info(best_at_out, TensorProto.INT64, ["Q", c]),
        ])
        _, candidates = b.node("Loop", [b.const(np.array(n_chunks, dtype=np.int64)), b.const(np.array(True)), init,
                                        init_at], "best", n_out=2, body=body)
    # the candidates' distances as Σ (x - y)², one candidate at a time (a (Q, D) block each, not
    # (Q, c, D)), (Q, c); then the k smallest, averaged
    exact = []
    for j in range(c):
        at = b.node("Gather", [candidates, b.const(np.array(j, dtype=np.int64))], "candidate", axis=1)  # (Q,)
        diff = b.node("Sub", [b.node("Gather", [y, at], "candidate_rows", axis=0), queries], "diff")  # (Q, D)
        exact.append(b.node("ReduceSumSquare", [diff], "exact", axes=[1], keepdims=1))  # (Q, 1)
    exact = b.node("Concat", exact, "candidates_exact", axis=1)  # (Q, c)
    if c > k:
        exact = b.node("TopK", [exact, b.const(np.array([k], dtype=np.int64))], "nearest", n_out=2, axis=1,
                       largest=0, sorted=1)[0]  # (Q, k)
    return b.node("ReduceMean", [exact], "patch_scores", axes=[1], keepdims=0)  # (Q,)


def _reflect_index(n: int, radius: int) -> np.ndarray:
    """scipy's 'reflect' padding of a length-n axis by ``radius``, as indices (n + 2r,)."""
    idx = np.arange(-radius, n + radius) % (2 * n)
    return np.where(idx >= n, 2 * n - 1 - idx, idx).astype(np.int64)


def _append_scoring(
    features_model, model: PatchCore, grids: Sequence[tuple[int, int]], block_bytes: int
):
    """Appends the search, the scores and the map to the feature graph; outputs ``OUTPUT_NAMES``."""
    from onnx import TensorProto, helper

    graph = features_model.graph
    feature_outputs = [o.name for o in graph.output]
    del graph.output[:]
    b = _Builder(graph, "score_")
    _, H, W = model.params[0].input_shape
    scores, maps = [], []
    for m, (p, bank, (h, w)) in enumerate(zip(model.params, model.banks, grids)):
        D = p.target_embed_dimension
        queries = b.node("Reshape", [feature_outputs[m], b.const(np.array([-1, D], dtype=np.int64))], "queries")  # (B*N, D)
        vectors = bank.vectors.detach().cpu().numpy()
        patch = _search_nodes(b, queries, vectors, p.anomaly_scorer_num_nn, h * w, block_bytes)  # (B*N,)
        patch = b.node("Reshape", [patch, b.const(np.array([-1, 1, h, w], dtype=np.int64))], "patch")  # (B, 1, h, w)
        scores.append(b.node("ReduceMax", [patch], "member_score", axes=[2, 3], keepdims=0))  # (B, 1)
        # bilinear, align_corners=False, to (B, 1, H, W): torch's interpolate as its exporter writes it
        batch = b.node("Slice", [b.node("Shape", [patch]), b.const(np.array([0])), b.const(np.array([2]))])
        size = b.node("Concat", [batch, b.const(np.array([H, W], dtype=np.int64))], axis=0)
        maps.append(b.node("Resize", [patch, "", "", size], "up", mode="linear",
                           coordinate_transformation_mode="pytorch_half_pixel"))  # (B, 1, H, W)
    member_scores = b.node("Concat", scores, axis=1) if len(scores) > 1 else scores[0]  # (B, M)
    graph.node.append(helper.make_node("Identity", [member_scores], [OUTPUT_NAMES[1]], name="member_scores"))
    graph.node.append(helper.make_node("ReduceMean", [OUTPUT_NAMES[1]], [OUTPUT_NAMES[0]], name="score",
                                       axes=[1], keepdims=0))  # (B,)
    mean_map = b.node("Mean", maps) if len(maps) > 1 else maps[0]  # (B, 1, H, W); the blur is linear
    kernel = gaussian_kernel1d(4.0, 4.0, torch.float32).numpy()  # (2r+1,)
    r = (len(kernel) - 1) // 2
    x = b.node("Gather", [mean_map, b.const(_reflect_index(W, r))], "pad_w", axis=3)  # (B, 1, H, W + 2r)
    x = b.node("Conv", [x, b.const(kernel.reshape(1, 1, 1, -1))], "blur_w")  # (B, 1, H, W)
    x = b.node("Gather", [x, b.const(_reflect_index(H, r))], "pad_h", axis=2)  # (B, 1, H + 2r, W)
    x = b.node("Conv", [x, b.const(kernel.reshape(1, 1, -1, 1))], "blur_h")  # (B, 1, H, W)
    graph.node.append(helper.make_node("Squeeze", [x, b.const(np.array([1]))], [OUTPUT_NAMES[2]], name="segmentation"))
    graph.output.extend([
        helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, ["batch", len(model)]),
        helper.make_tensor_value_info(OUTPUT_NAMES[2], TensorProto.FLOAT, ["batch", H, W]),
    ])
    return features_model


# ---------------------------------------------------------------------------------------- files
def _metadata(
    model: PatchCore,
    resize: int,
    weights_sha256: dict[str, str | None],
    thresholds: dict[str, float | None] | None,
    source: str,
) -> dict:
    _, H, W = model.params[0].input_shape
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "source": source,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", H, W, 3],
            "dtype": "uint8",
            "layout": "NHWC, RGB",
        },
        "outputs": {
            OUTPUT_NAMES[0]: ["batch"],
            OUTPUT_NAMES[1]: ["batch", len(model)],
            OUTPUT_NAMES[2]: ["batch", H, W],
        },
        "preprocessing": {
            "convert": "RGB",
            "resize": resize,  # the shorter side, the longer int(resize * long / short)
            "resample": "bilinear",  # PIL's Image.BILINEAR (torchvision's Resize on PIL images)
            "center_crop": [H, W],  # top = round((height - H) / 2), left likewise; zero padding when smaller
            "imagesize": H,
            "mean": list(IMAGENET_MEAN),  # in the graph: (pixel / 255 - mean) / std
            "std": list(IMAGENET_STD),
        },
        "members": [
            {
                "backbone": p.backbone,
                "layers": list(p.layers),
                "pretrain_embed_dimension": p.pretrain_embed_dimension,
                "target_embed_dimension": p.target_embed_dimension,
                "patchsize": p.patchsize,
                "patchstride": p.patchstride,
                "k": p.anomaly_scorer_num_nn,
                "bank_rows": len(bank),
                "weights_sha256": weights_sha256.get(p.backbone),
            }
            for p, bank in zip(model.params, model.banks)
        ],
        "thresholds": thresholds,
        "openvino_compile_config": OPENVINO_CONFIG,
    }


def _graph_digest(metadata: dict) -> str:
    """What the graph stores of metadata.json (its ``metadata_props``): the fields it was built for."""
    fields = {k: metadata[k] for k in ("format_version", "input", "outputs", "preprocessing", "members")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def export_model(
    model: PatchCore,
    out_dir: str | os.PathLike,
    resize: int,
    weights_sha256: dict[str, str | None] | None = None,
    thresholds: dict[str, float | None] | None = None,
    source: str = "",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    external_data: bool | None = None,
) -> Path:
    """Write ``model.onnx`` and ``metadata.json`` of a loaded PatchCore into ``out_dir``; returns the
    ONNX file.

    Args:
        model: a PatchCore with its banks (e.g. ``PatchCore.from_folder``), on the CPU.
        out_dir: the folder to write; created if missing.
        resize: the shorter side images are resized to before the centre crop (``data.resize``).
        weights_sha256: backbone name → sha256 of its weights file (None: random weights).
        thresholds: ``{"image_threshold": ..., "pixel_threshold": ...}`` (raw values), or None.
        source: the model folder, recorded in metadata.json.
        block_bytes: the largest distance block (and chunk of bank rows) at batch 1; at most 256 MiB.
        external_data: write the initializers to ``model.onnx.data`` beside the graph; by default when
            they pass 512 MiB (ONNX's protobuf cannot hold 2 GiB, and ONNX Runtime memory-maps them).
    """
    import onnx

    if model.banks is None:
        raise ValueError("this PatchCore has no memory banks to export")
    if not 0 < block_bytes <= 256 << 20:
        raise ValueError(f"block_bytes must be in (0, 256 MiB], got {block_bytes}")
    shapes = {tuple(p.input_shape) for p in model.params}
    if len(shapes) != 1:
        raise ValueError(f"the members expect different input shapes {sorted(shapes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    features_path = out_dir / ".features.onnx"
    model = model.cpu().eval()
    try:
        grids = _export_features(model, features_path)
        features = onnx.load(str(features_path))
    finally:
        features_path.unlink(missing_ok=True)
    full = _append_scoring(features, model, grids, block_bytes)
    metadata = _metadata(model, resize, weights_sha256 or {}, thresholds, source)
    onnx.helper.set_model_props(full, {"patchcore_metadata_sha256": _graph_digest(metadata),
                                       "patchcore_format_version": str(EXPORT_FORMAT_VERSION)})
    full.producer_name = "patchcore_lightning"
    if external_data is None:
        external_data = sum(t.ByteSize() for t in full.graph.initializer) > EXTERNAL_DATA_ABOVE
    data_file = target.with_name("model.onnx.data")
    data_file.unlink(missing_ok=True)
    if external_data:
        onnx.save_model(full, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file.name, size_threshold=1024)
        onnx.checker.check_model(str(target))
    else:
        onnx.checker.check_model(full)
        onnx.save_model(full, str(target))
    metadata["files"] = {"onnx": target.name, **({"onnx_data": data_file.name} if external_data else {})}
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("exported %s (%d member(s), %.1f MB) -> %s", source or "model", len(model),
             (target.stat().st_size + (data_file.stat().st_size if external_data else 0)) / 1e6, target)
    return target


def to_openvino(onnx_path: str | os.PathLike) -> Path:
    """Convert an exported model.onnx to OpenVINO IR (model.xml + model.bin beside it), weights in
    f32; metadata.json gains the IR's file names. Needs the ``openvino`` extra."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError("--export.format openvino needs OpenVINO: pip install 'patchcore_lightning[openvino]'") from None
    onnx_path = Path(onnx_path)
    ov_model = ov.convert_model(str(onnx_path))
    meta_path = onnx_path.with_name("metadata.json")
    metadata = json.loads(meta_path.read_text())
    ov_model.set_rt_info(_graph_digest(metadata), ["patchcore", "metadata_sha256"])
    ov_model.set_rt_info(str(EXPORT_FORMAT_VERSION), ["patchcore", "format_version"])
    xml = onnx_path.with_name("model.xml")
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # the default stores the weights in fp16
    metadata["files"].update({"openvino_xml": xml.name, "openvino_bin": xml.with_suffix(".bin").name})
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("converted to OpenVINO IR -> %s (compile with %s)", xml, OPENVINO_CONFIG)
    return xml


def _thresholds(module, folder: str, dataset_name: str) -> dict[str, float | None] | None:
    """The raw thresholds predict would use for ``folder``: the module's, or its row of thresholds_csv."""
    from .reporting import read_thresholds

    h = module.hparams
    if h.thresholds_csv:
        try:
            rows = read_thresholds(h.thresholds_csv)
        except OSError as err:
            raise FileNotFoundError(f"model.thresholds_csv {h.thresholds_csv} cannot be read: {err.strerror or err}") from None
        names = [os.path.basename(os.path.normpath(folder)), dataset_name]
        name = next((n for n in names if n in rows), None)
        if name is None:
            raise ValueError(f"{h.thresholds_csv} has no row for {folder} ({' or '.join(dict.fromkeys(names))}); "
                             f"it has {sorted(rows)}")
        values = {k: rows[name][k] for k in ("image_threshold", "pixel_threshold")}
        return {k: None if math.isnan(v) else float(v) for k, v in values.items()}
    if h.image_threshold is not None or h.pixel_threshold is not None:
        return {"image_threshold": h.image_threshold, "pixel_threshold": h.pixel_threshold}
    return None


def export_folders(module, datamodule, results_dir: str | os.PathLike, options: ExportOptions) -> list[Path]:
    """``export``: every folder of ``model.model_paths`` to ``<results_dir>/export/<folder name>/``
    (model.onnx, metadata.json; model.xml/.bin for ``openvino``). Returns the ONNX files. Without
    model_paths, the folders ``fit`` wrote under ``<results_dir>/models/`` for ``data.categories``.

    Folder i goes with category i of ``data.categories`` (its dataset name finds its thresholds.csv
    row when the folder's own name does not); a folder that cannot be loaded fails as in ``test``.
    """
    paths = list(module.hparams.model_paths or [])
    if not paths:  # the folders ``fit`` wrote for data.categories, as ``test`` takes them
        paths = [str(Path(results_dir) / "models" / datamodule.dataset_name_of(c)) for c in datamodule.categories]
        missing = [p for p in paths if not Path(p).is_dir()]
        if missing:
            raise ValueError(f"model.model_paths is empty and fit has not written {missing}: "
                             f"give the model folder(s) to export")
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"model.model_paths has folders of the same name {names}: each is exported to export/<name>")
    if not 0 < options.block_mib <= 256:
        raise ValueError(f"export.block_mib must be in [1, 256], got {options.block_mib}")
    if options.format not in ("onnx", "openvino"):
        raise ValueError(f"export.format must be onnx or openvino, got {options.format!r}")
    h, categories = module.hparams, datamodule.categories
    written = []
    for i, (folder, name) in enumerate(zip(paths, names)):
        model = PatchCore.from_folder(folder, datamodule.imagesize, module.backbone_cache, "auto", h.allow_other_weights)
        category = categories[i] if len(categories) == len(paths) else categories[0]
        target = export_model(
            model,
            Path(results_dir) / "export" / name,
            datamodule.hparams.resize,
            {p.backbone: module.backbone_cache.sha256.get(p.backbone) for p in model.params},
            _thresholds(module, folder, datamodule.dataset_name_of(category)),
            source=str(folder),
            block_bytes=options.block_mib << 20,
        )
        if options.format == "openvino":
            to_openvino(target)
        written.append(target)
    return written
