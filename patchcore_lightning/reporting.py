"""What a run leaves behind: results.csv, thresholds.csv and their resume state, predictions.csv,
and the pictures (heatmaps over images, overlay strips, ROC curves) the callbacks write. Files are
written atomically (a temporary file, then a rename): a reader never sees half a table; each gets
the mode a plain ``open(path, "w")`` gives it (an existing file's, else 0o666 less the umask)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .metrics import METRIC_NAMES, THRESHOLD_NAMES

__all__ = [
    "RESULTS_COLUMNS",
    "blend",
    "category_fingerprint",
    "colorize",
    "compose",
    "mean_row",
    "overlay_strip",
    "read_results",
    "read_run_state",
    "read_thresholds",
    "review_grid",
    "roc_image",
    "write_predictions",
    "write_results",
    "write_run_state",
    "write_thresholds",
]

RUN_STATE_FILE = "results_config.json"

RESULTS_COLUMNS = METRIC_NAMES


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, opened for writing, with the mode ``open(path, "w")`` would give
    ``path``: its own where it exists, else 0o666 less the umask (the kernel applies it, as for
    ``open``; ``tempfile.mkstemp`` would make it 0o600, unreadable to anyone else)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mean_row(rows: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The ``mean`` row: each metric averaged over the datasets that have it (NaN is left out: the
    pixel columns of a category without masks), NaN where none has it."""
    means = {}
    for c in RESULTS_COLUMNS:
        values = [float(m[c]) for m in rows.values() if not math.isnan(float(m[c]))]
        means[c] = float(np.mean(values)) if values else math.nan
    return means


def _write_table(path: Path, columns: Sequence[str], rows: Mapping[str, Mapping[str, float]], mean: bool) -> None:
    """A csv table: ``dataset_name`` and ``columns``, a row per dataset in order (then their mean),
    floats at full precision; written to a temporary file and renamed."""
    lines = [["dataset_name", *columns]]
    for name, values in rows.items():
        lines.append([name, *(repr(float(values[c])) for c in columns)])
    if rows and mean:
        means = mean_row(rows)
        lines.append(["mean", *(repr(means[c]) for c in columns)])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    _atomic_write_text(path, buffer.getvalue())


def _read_table(path: str | os.PathLike, columns: Sequence[str]) -> dict[str, dict[str, float]]:
    with open(path, newline="") as handle:
        return {row["dataset_name"]: {c: float(row[c]) for c in columns} for row in csv.DictReader(handle)}


def write_results(path: str | os.PathLike, rows: Mapping[str, Mapping[str, float]]) -> None:
    """results.csv: a row per dataset in order, then their ``mean``."""
    _write_table(Path(path), RESULTS_COLUMNS, rows, mean=True)


def read_results(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """results.csv back as {dataset_name: {metric: value}} (the mean row included)."""
    return _read_table(path, RESULTS_COLUMNS)


def write_thresholds(path: str | os.PathLike, rows: Mapping[str, Mapping[str, float]]) -> None:
    """thresholds.csv: ``dataset_name,image_threshold,image_f1,pixel_threshold,pixel_f1``, a row per dataset."""
    _write_table(Path(path), THRESHOLD_NAMES, rows, mean=False)


def read_thresholds(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """thresholds.csv back as {dataset_name: {column: value}}."""
    try:
        return _read_table(path, THRESHOLD_NAMES)
    except KeyError as err:
        raise ValueError(f"{path}: no column {err.args[0]!r} (expected {','.join(THRESHOLD_NAMES)})") from None


def category_fingerprint(settings: Mapping[str, object], model_folder: str | os.PathLike) -> str:
    """sha256 of what decides a category's numbers: the settings and every file of its model folder."""
    if not Path(model_folder).is_dir():
        raise FileNotFoundError(f"model folder not found: {model_folder}")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(Path(model_folder).iterdir()):
        if path.is_file() and path.suffix in (".pkl", ".faiss"):
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def write_run_state(results_dir: str | os.PathLike, rows: Mapping[str, Mapping[str, float]], fingerprints: Mapping[str, str]) -> None:
    """results.csv, thresholds.csv and, first, results_config.json (the fingerprint of every row),
    each atomically. ``rows`` hold the metrics and the thresholds of every dataset.

    The JSON is written first and results.csv last: an interruption leaves a fingerprint without a
    row (that category is computed again), never a row without its fingerprint or thresholds.
    """
    results_dir = Path(results_dir)
    state = {"fingerprints": {name: fingerprints[name] for name in rows}}
    _atomic_write_text(results_dir / RUN_STATE_FILE, json.dumps(state, indent=2) + "\n")
    write_thresholds(results_dir / "thresholds.csv", rows)
    write_results(results_dir / "results.csv", rows)


def read_run_state(results_dir: str | os.PathLike) -> dict[str, tuple[dict[str, float], str]]:
    """{dataset_name: (row, fingerprint)} of a previous run's results.csv; empty if there is none."""
    results_dir = Path(results_dir)
    if not (results_dir / "results.csv").is_file():
        return {}
    rows = read_results(results_dir / "results.csv")
    rows.pop("mean", None)
    try:
        fingerprints = json.loads((results_dir / RUN_STATE_FILE).read_text())["fingerprints"]
        thresholds = read_thresholds(results_dir / "thresholds.csv")
    except (OSError, ValueError, KeyError):
        raise ValueError(
            f"cannot resume: {results_dir / 'results.csv'} has no readable {RUN_STATE_FILE} and thresholds.csv "
            f"saying how it was computed; rerun without --resume true, or use another results_dir"
        ) from None
    missing = [name for name in rows if name not in fingerprints or name not in thresholds]
    if missing:
        raise ValueError(f"cannot resume: {RUN_STATE_FILE} or thresholds.csv lacks {missing}; rerun without --resume true")
    return {name: ({**row, **thresholds[name]}, fingerprints[name]) for name, row in rows.items()}


def write_predictions(
    results_dir: str | os.PathLike,
    rows: Sequence[Mapping],
    image_threshold: float | None,
    pixel_threshold: float | None,
    n_members: int,
) -> int:
    """predictions.csv (path, raw score[, per-member scores][, is_anomalous][, anomalous_pixels]) and
    skipped.csv (path, reason), both atomically; returns the number of scored images.

    A scored row holds ``score`` (the mean of the members' raw scores), ``scores`` (each member's)
    and, with a pixel threshold, ``anomalous_pixels``; a skipped one ``error``.
    """
    results_dir = Path(results_dir)
    scored = [r for r in rows if "error" not in r]
    header = ["path", "score"]
    if n_members > 1:
        header += [f"score_member{i}" for i in range(1, n_members + 1)]
    if image_threshold is not None:
        header.append("is_anomalous")
    if pixel_threshold is not None:
        header.append("anomalous_pixels")
    lines = [header]
    for row in scored:
        line = [row["path"], repr(float(row["score"]))]
        if n_members > 1:
            line += [repr(float(v)) for v in row["scores"]]
        if image_threshold is not None:
            line.append(int(row["score"] >= image_threshold))
        if pixel_threshold is not None:
            line.append(int(row["anomalous_pixels"]))
        lines.append(line)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    _atomic_write_text(results_dir / "predictions.csv", buffer.getvalue())
    skipped = [r for r in rows if "error" in r]
    skipped_path = results_dir / "skipped.csv"
    if skipped:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([["path", "reason"], *[[r["path"], r["error"]] for r in skipped]])
        _atomic_write_text(skipped_path, buffer.getvalue())
    elif skipped_path.exists():
        skipped_path.unlink()  # a stale list from an earlier run would mislead
    return len(scored)


def colorize(values: torch.Tensor) -> torch.Tensor:
    """A 'jet'-like colour map of values in [0, 1]: (H, W) → (H, W, 3) uint8."""
    v = values.clamp(0, 1)
    r = (1.5 - (4 * v - 3).abs()).clamp(0, 1)
    g = (1.5 - (4 * v - 2).abs()).clamp(0, 1)
    b = (1.5 - (4 * v - 1).abs()).clamp(0, 1)
    return (torch.stack([r, g, b], dim=-1) * 255).round().to(torch.uint8)


def blend(image: np.ndarray, heat: torch.Tensor) -> np.ndarray:
    """The colour-mapped heat (H, W) in [0, 1] over the image (H, W, 3) uint8, half and half."""
    colours = colorize(heat.float().cpu()).numpy()
    return (0.5 * image.astype(np.float32) + 0.5 * colours.astype(np.float32)).round().astype(np.uint8)


def compose(panels: Sequence[np.ndarray], caption: str) -> Image.Image:
    """Panels (H, W, 3) uint8 side by side under a caption band."""
    H, W = panels[0].shape[:2]
    band = 18
    canvas = Image.new("RGB", (len(panels) * W, H + band), "white")
    for i, panel in enumerate(panels):
        canvas.paste(Image.fromarray(panel), (i * W, band))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill="black")
    return canvas


def overlay_strip(image: np.ndarray, mask: np.ndarray, heat: torch.Tensor, caption: str) -> Image.Image:
    """image (H, W, 3) uint8 | ground truth (H, W) uint8 | heatmap over the image, with a caption."""
    return compose([image, np.repeat(mask[..., None], 3, axis=2), blend(image, heat)], caption)


def roc_image(curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]], size: int = 320) -> np.ndarray:
    """ROC curves drawn on a white canvas (FPR right, TPR up), one colour each. → (3, H, W) uint8"""
    margin = 28
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    span = size - 2 * margin
    draw.rectangle([margin, margin, size - margin, size - margin], outline="black")
    draw.line([(margin, size - margin), (size - margin, margin)], fill=(180, 180, 180))
    colours = [(200, 30, 30), (30, 80, 200), (20, 150, 60)]
    for k, (label, (fpr, tpr)) in enumerate(curves.items()):
        if len(fpr) > 2000:  # enough vertices for the eye; keep the ends
            keep = torch.linspace(0, len(fpr) - 1, 2000).round().long()
            fpr, tpr = fpr[keep], tpr[keep]
        points = [(margin + float(x) * span, size - margin - float(y) * span) for x, y in zip(fpr, tpr)]
        draw.line(points, fill=colours[k % len(colours)], width=2)
        draw.text((margin + 4, margin + 4 + 12 * k), label, fill=colours[k % len(colours)])
    draw.text((size // 2 - 10, size - margin + 6), "FPR", fill="black")
    draw.text((4, size // 2), "TPR", fill="black")
    return np.asarray(canvas).transpose(2, 0, 1).copy()


def review_grid(strips: Sequence[Image.Image]) -> np.ndarray:
    """Overlay strips stacked vertically into one image. → (3, H, W) uint8"""
    width = max(s.width for s in strips)
    grid = Image.new("RGB", (width, sum(s.height for s in strips)), "white")
    top = 0
    for strip in strips:
        grid.paste(strip, (0, top))
        top += strip.height
    return np.asarray(grid).transpose(2, 0, 1).copy()
