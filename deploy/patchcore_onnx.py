#!/usr/bin/env python
"""Score a folder of images with a PatchCore model exported by ``lightning_cli.py export``, without torch.

    python deploy/patchcore_onnx.py --model results/export/mvtec_bottle --images new_images/ --out scored/

Needs numpy, pillow and onnxruntime (or openvino); one file, copy it where it runs. It reads
``metadata.json`` beside the graph, refuses a graph that does not match it and a format version
newer than it knows, and prepares every image as ``test`` and ``predict`` do, with PIL, to the
metadata's contract: convert to RGB, resize the shorter side to ``resize`` (bilinear), centre-crop
``imagesize``; the graph takes them as uint8 (B, H, W, 3) and normalises them itself.

Writes under ``--out``: ``predictions.csv`` with predict's columns (``path``, ``score`` (the raw
image score; for an ensemble the mean of the members'), ``score_member<i>`` for ensembles,
``is_anomalous`` with an image threshold, ``anomalous_pixels`` with a pixel threshold),
``skipped.csv`` (files that could not be read, and why), and with ``--heatmaps``
``heatmaps/<path without its extension>.png``, named as predict names them (the image | the raw map over it on the scale 0..heatmap_max, as predict
draws them), ``<name>_mask.png`` with a pixel threshold and ``.npy`` raw maps with ``--save-raw-maps``.

OpenVINO is always compiled with ``INFERENCE_PRECISION_HINT: f32``: its CPU plugin otherwise runs
in bf16 on CPUs with AMX or AVX512-BF16, and the scores move by ~1e-1.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1  # the newest metadata.json format this runtime reads
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OUTPUT_NAMES = ("score", "member_scores", "segmentation")
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}

log = logging.getLogger("patchcore_onnx")


class ExportError(ValueError):
    """An export folder this runtime cannot use: missing files, a mismatch, a newer format."""


# ------------------------------------------------------------------------------------ the export
def read_metadata(folder: Path) -> dict:
    """metadata.json of an export folder, checked for a format this runtime reads."""
    path = folder / "metadata.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no metadata.json: not a folder written by lightning_cli.py export")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} cannot be read: {err}") from None
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ExportError(f"{path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{path} is export format version {version}; this runtime reads up to {FORMAT_VERSION}: "
            f"use the deploy/patchcore_onnx.py of the patchcore_lightning that exported it"
        )
    for key in ("input", "outputs", "preprocessing", "members"):
        if key not in meta:
            raise ExportError(f"{path} has no {key!r}")
    return meta


def metadata_digest(meta: dict) -> str:
    """sha256 of the fields the graph was built for; the exporter stores it in the graph."""
    fields = {k: meta[k] for k in ("format_version", "input", "outputs", "preprocessing", "members")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _varint(handle) -> int:
    shift = result = 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise EOFError
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def onnx_metadata_props(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (ModelProto field 14), read without the onnx package:
    the top-level fields are walked and the graph skipped by its length."""
    props: dict[str, str] = {}
    with open(path, "rb") as handle:
        while True:
            try:
                tag = _varint(handle)
            except EOFError:
                return props
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(handle)
            elif wire == 1:
                handle.seek(8, os.SEEK_CUR)
            elif wire == 5:
                handle.seek(4, os.SEEK_CUR)
            elif wire == 2:
                size = _varint(handle)
                if field != 14:
                    handle.seek(size, os.SEEK_CUR)
                    continue
                entry, key, value = io.BytesIO(handle.read(size)), "", ""
                while entry.tell() < size:
                    sub = _varint(entry)
                    text = entry.read(_varint(entry)).decode()
                    key, value = (text, value) if sub >> 3 == 1 else (key, text)
                props[key] = value
            else:
                raise ExportError(f"{path} is not an ONNX file")


class Runtime:
    """The exported graph on ONNX Runtime or OpenVINO: uint8 images (B, H, W, 3) → score (B,),
    member_scores (B, M), segmentation (B, H, W)."""

    def __init__(self, folder: str | os.PathLike, runtime: str = "auto", graph: str = "auto",
                 device: str = "CPU", threads: int = 0) -> None:
        self.folder = Path(folder)
        self.meta = read_metadata(self.folder)
        files = self.meta.get("files", {})
        if runtime == "auto":
            runtime = "onnxruntime" if _importable("onnxruntime") else "openvino"
        self.runtime = runtime
        if graph == "auto":
            graph = "ir" if runtime == "openvino" and files.get("openvino_xml") else "onnx"
        name = files.get("openvino_xml" if graph == "ir" else "onnx", "model.xml" if graph == "ir" else "model.onnx")
        self.path = self.folder / name
        if not self.path.is_file():
            raise ExportError(f"{self.path} not found (metadata.json's files: {files})")
        if runtime == "onnxruntime":
            import onnxruntime as ort

            if graph != "onnx":
                raise ExportError("ONNX Runtime runs the ONNX file: use --graph onnx")
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            inputs = [(i.name, list(i.shape), i.type) for i in self.session.get_inputs()]
            outputs = [(o.name, list(o.shape)) for o in self.session.get_outputs()]
        elif runtime == "openvino":
            import openvino as ov

            core = ov.Core()
            model = self._ov_model = core.read_model(str(self.path))
            config = dict(OPENVINO_F32)
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            self.compiled = core.compile_model(model, device, config)
            precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
            if "f32" not in precision and "float32" not in precision:
                raise ExportError(f"OpenVINO compiled the graph at {precision}, not f32: the scores would be off")
            inputs = [(i.get_any_name(), _ov_shape(i.get_partial_shape()), str(i.get_element_type()))
                      for i in model.inputs]
            outputs = [(o.get_any_name(), _ov_shape(o.get_partial_shape())) for o in model.outputs]
            self.request = self.compiled.create_infer_request()
        else:
            raise ExportError(f"--runtime must be onnxruntime or openvino, got {runtime!r}")
        self._check_graph(graph, inputs, outputs)

    def _check_graph(self, graph: str, inputs: list, outputs: list) -> None:
        """Refuse a graph whose inputs, outputs or recorded metadata disagree with metadata.json."""
        meta, where = self.meta, f"{self.path} and {self.folder / 'metadata.json'} disagree"
        expected = meta["input"]
        if len(inputs) != 1 or inputs[0][0] != expected["name"] or "uint8" not in str(inputs[0][2]) \
                or inputs[0][1][1:] != expected["shape"][1:]:
            raise ExportError(f"{where}: the graph takes {inputs}, metadata.json says {expected}")
        shapes = {name: shape for name, shape in outputs}
        for name, shape in meta["outputs"].items():
            if name not in shapes or shapes[name][1:] != shape[1:]:
                raise ExportError(f"{where}: output {name} is {shapes.get(name)} in the graph, {shape} in metadata.json")
        if len(meta["members"]) != meta["outputs"]["member_scores"][1]:
            raise ExportError(f"{where}: {len(meta['members'])} members listed, member_scores has {meta['outputs']['member_scores'][1]}")
        if graph == "onnx":
            recorded = onnx_metadata_props(self.path).get("patchcore_metadata_sha256")
        else:
            try:
                recorded = self._ov_model.get_rt_info(["patchcore", "metadata_sha256"]).astype(str)
            except RuntimeError:  # no such entry
                recorded = None
        if recorded != metadata_digest(meta):
            raise ExportError(f"{where}: the graph was exported with another metadata.json "
                              f"(recorded {recorded}, this one {metadata_digest(meta)})")

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 (B, H, W, 3) → score (B,), member_scores (B, M), segmentation (B, H, W)."""
        if self.runtime == "onnxruntime":
            return tuple(self.session.run(list(OUTPUT_NAMES), {self.meta["input"]["name"]: images}))
        result = self.request.infer({self.meta["input"]["name"]: images})
        by_name = {o.get_any_name(): v for o, v in result.items()}
        return tuple(np.array(by_name[n]) for n in OUTPUT_NAMES)


def _ov_shape(shape) -> list:
    return [d.get_length() if d.is_static else "batch" for d in shape]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------ the images
def list_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (png, jpg/jpeg, bmp, tif/tiff, any case), in sorted relative path order."""
    if not root.is_dir():
        raise FileNotFoundError(f"--images folder not found: {root}")
    images = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                    key=lambda p: p.relative_to(root).as_posix())
    if not images:
        raise FileNotFoundError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return images


def prepare(image: Image.Image, resize: int, crop: tuple[int, int]) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(crop) on a PIL image, as ``test`` applies them. → (H, W, 3) uint8"""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)  # (width, height)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    ch, cw = crop
    w, h = image.size
    if cw > w or ch > h:  # torchvision pads with zeros, then crops
        padded = Image.new("RGB", (max(w, cw), max(h, ch)))
        padded.paste(image, ((cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0))
        image = padded
        w, h = image.size
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return np.asarray(image.crop((left, top, left + cw, top + ch)), dtype=np.uint8)


def load(path: Path, resize: int, crop: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """The prepared pixels, or None and why the file cannot be read."""
    try:
        with Image.open(path) as image:
            return prepare(image, resize, crop), ""
    except Exception as err:  # unreadable or truncated: reported, not fatal
        return None, f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------------ the outputs
def _atomic_write(path: Path, rows: list[list]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", newline="") as out:
        out.write(buffer.getvalue())
    os.replace(tmp, path)


def write_tables(out: Path, rows: list[dict], thresholds: dict, n_members: int) -> int:
    """predictions.csv with predict's columns, skipped.csv (removed when nothing was skipped)."""
    image_t, pixel_t = thresholds.get("image_threshold"), thresholds.get("pixel_threshold")
    header = ["path", "score"] + [f"score_member{i}" for i in range(1, n_members + 1) if n_members > 1]
    header += ["is_anomalous"] * (image_t is not None) + ["anomalous_pixels"] * (pixel_t is not None)
    scored = [r for r in rows if "error" not in r]
    lines = [header]
    for r in scored:
        line = [r["path"], repr(float(r["score"]))]
        if n_members > 1:
            line += [repr(float(v)) for v in r["scores"]]
        if image_t is not None:
            line.append(int(r["score"] >= image_t))
        if pixel_t is not None:
            line.append(int(r["anomalous_pixels"]))
        lines.append(line)
    _atomic_write(out / "predictions.csv", lines)
    skipped = [r for r in rows if "error" in r]
    if skipped:
        _atomic_write(out / "skipped.csv", [["path", "reason"], *[[r["path"], r["error"]] for r in skipped]])
    elif (out / "skipped.csv").exists():
        (out / "skipped.csv").unlink()  # a stale list from an earlier run would mislead
    return len(scored)


def colorize(values: np.ndarray) -> np.ndarray:
    """predict's 'jet'-like colour map of values in [0, 1]: (H, W) → (H, W, 3) uint8."""
    v = np.clip(values, 0, 1).astype(np.float32)
    channels = [np.clip(1.5 - np.abs(4 * v - c), 0, 1) for c in (3, 2, 1)]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def heatmap_names(paths: list[str], masks: bool = False, raw_maps: bool = False) -> list[str]:
    """predict's heatmap names (``patchcore_lightning.callbacks.heatmap_names``, repeated here because
    this file imports nothing of the package; tests/test_export.py checks they agree): each input's
    relative path without its extension (``day1/000.png`` →
    ``day1/000``), or with it where inputs of one folder differ only in their extension (``a.png`` and
    ``a.jpg``), compared ignoring case; ValueError where two inputs would still write one file."""
    stems = [str(PurePosixPath(p).with_suffix("")) for p in paths]
    shared = Counter(stem.casefold() for stem in stems)
    names = [path if shared[stem.casefold()] > 1 else stem for path, stem in zip(paths, stems)]
    suffixes = [".png", *(["_mask.png"] if masks else []), *([".npy"] if raw_maps else [])]
    owners: dict[str, str] = {}
    for path, name in zip(paths, names):
        for suffix in suffixes:
            other = owners.setdefault((name + suffix).casefold(), path)
            if other != path:
                raise ValueError(f"heatmaps/{name}{suffix} would be written for both {other} and {path}; rename one of them")
    return names


def heatmap(out: Path, name: str, path: str, score: float, pixels: np.ndarray, raw_map: np.ndarray, top: float,
            pixel_t: float | None, save_raw: bool) -> None:
    """heatmaps/<name>.png: the image | the raw map over it on the scale 0..top, captioned with the input's
    path and its score (as predict); <name>_mask.png with a pixel threshold, <name>.npy with save_raw."""
    target = out / "heatmaps" / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    blended = np.round(0.5 * pixels.astype(np.float32) + 0.5 * colorize(raw_map / top).astype(np.float32)).astype(np.uint8)
    H, W = pixels.shape[:2]
    band = 18
    canvas = Image.new("RGB", (2 * W, H + band), "white")
    canvas.paste(Image.fromarray(pixels), (0, band))
    canvas.paste(Image.fromarray(blended), (W, band))
    ImageDraw.Draw(canvas).text((4, 3), f"{path}  score {score:.6g}  scale 0..{top:.4g}", fill="black")
    canvas.save(target)
    if save_raw:
        np.save(out / "heatmaps" / f"{name}.npy", raw_map)
    if pixel_t is not None:
        Image.fromarray(((raw_map >= pixel_t).astype(np.uint8) * 255)).save(out / "heatmaps" / f"{name}_mask.png")


def score_folder(runtime: Runtime, images: Path, out: Path, batch_size: int = 8, heatmaps: bool = False,
                 heatmap_max: float | None = None, save_raw_maps: bool = False) -> list[dict]:
    """Score every image under ``images`` into ``out``; returns the rows (scored and skipped)."""
    meta = runtime.meta
    prep = meta["preprocessing"]
    crop = tuple(prep["center_crop"])
    thresholds = meta.get("thresholds") or {}
    pixel_t = thresholds.get("pixel_threshold")
    paths = list_images(images)
    names_of = dict(zip(paths, heatmap_names([p.relative_to(images).as_posix() for p in paths],
                                             masks=pixel_t is not None, raw_maps=save_raw_maps)))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for start in range(0, len(paths), batch_size):
        batch, names, files = [], [], []
        for path in paths[start : start + batch_size]:
            relative = path.relative_to(images).as_posix()
            pixels, error = load(path, prep["resize"], crop)
            if error:
                rows.append({"path": relative, "error": error})
            else:
                batch.append(pixels)
                names.append(relative)
                files.append(names_of[path])
        if not batch:
            continue
        pixels = np.stack(batch)  # (b, H, W, 3) uint8
        score, member_scores, maps = runtime(pixels)  # (b,), (b, M), (b, H, W)
        for i, name in enumerate(names):
            row = {"path": name, "score": float(score[i]), "scores": member_scores[i].tolist()}
            if pixel_t is not None:
                row["anomalous_pixels"] = int((maps[i] >= pixel_t).sum())
            rows.append(row)
            if heatmaps:
                top = heatmap_max or thresholds.get("image_threshold") or float(maps[i].max()) or 1.0
                heatmap(out, files[i], name, float(score[i]), pixels[i], maps[i], top, pixel_t, save_raw_maps)
    rows.sort(key=lambda r: r["path"])
    write_tables(out, rows, thresholds, len(meta["members"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export folder: metadata.json and model.onnx (model.xml)")
    parser.add_argument("--images", required=True, help="folder of images, searched recursively")
    parser.add_argument("--out", required=True, help="folder for predictions.csv, skipped.csv and heatmaps/")
    parser.add_argument("--runtime", choices=["auto", "onnxruntime", "openvino"], default="auto",
                        help="auto: ONNX Runtime when installed, else OpenVINO")
    parser.add_argument("--graph", choices=["auto", "onnx", "ir"], default="auto",
                        help="OpenVINO's input: the ONNX file or the IR (auto: the IR when exported)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="0: the runtime's default")
    parser.add_argument("--heatmaps", action="store_true", help="write heatmaps/<path>.png (and masks with a pixel threshold)")
    parser.add_argument("--heatmap-max", type=float, default=None, help="raw value at the top of the heatmaps' scale")
    parser.add_argument("--save-raw-maps", action="store_true", help="with --heatmaps: also the raw maps as .npy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        runtime = Runtime(args.model, args.runtime, args.graph, args.device, args.threads)
        start = time.perf_counter()
        rows = score_folder(runtime, Path(args.images), Path(args.out), args.batch_size, args.heatmaps,
                            args.heatmap_max, args.save_raw_maps)
    except (ExportError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = sum("error" in r for r in rows)
    log.info("scored %d images in %.1f s with %s (%s) -> %s", len(rows) - skipped, time.perf_counter() - start,
             runtime.runtime, runtime.path.name, Path(args.out) / "predictions.csv")
    if skipped:
        log.info("skipped %d unreadable files -> %s", skipped, Path(args.out) / "skipped.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
