"""Images and masks deeper than 8 bits: 16-bit and 32-bit integers keep their top 8 bits, floats in
[0, 1] their nearest 8-bit level, masks are anomalous where non-zero; an 8-bit data set and its
16-bit (x257) and float (/255) twins give byte-identical results.csv, thresholds.csv and
predictions.csv; samples without a range are refused, naming the file."""

from __future__ import annotations

import csv
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_lightning.cli import main
from patchcore_lightning.data import images, png
from patchcore_lightning.data.images import DataError, Sample, decode_image, decode_mask, read_image, read_mask
from patchcore_lightning.data.mvtec import MVTecDataset

from .conftest import FIXTURE

EVERY_16_BIT = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # (256, 256): every 16-bit value once


def write_png(path: Path, samples: np.ndarray, transparent: tuple[int, ...] | None = None) -> Path:
    """A PNG of 16-bit samples (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB or (H, W, 4) RGBA,
    written by hand (PIL writes no 16-bit colour PNG), with a transparent colour if given."""
    channels = samples.shape[2] if samples.ndim == 3 else 1
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # gray, gray+alpha, RGB, RGBA
    h, w = samples.shape[:2]
    rows = samples.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    trns = chunk(b"tRNS", struct.pack(f">{len(transparent)}H", *transparent)) if transparent else b""
    path.write_bytes(png.SIGNATURE + chunk(b"IHDR", header) + trns + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def write_tiff(path: Path, samples: np.ndarray, sample_format: int) -> Path:
    """An uncompressed little-endian TIFF of samples (H, W) or (H, W, 3), written by hand (PIL writes
    neither 16-bit RGB nor unsigned 32-bit TIFFs); ``sample_format`` 1 unsigned, 2 signed, 3 float."""
    h, w = samples.shape[:2]
    channels = samples.shape[2] if samples.ndim == 3 else 1
    data = samples.astype(samples.dtype.newbyteorder("<")).tobytes()
    bits = samples.dtype.itemsize * 8
    n_entries = 11
    extra_at = 8 + 2 + 12 * n_entries + 4  # per-channel values that do not fit an entry follow the IFD
    extra = b""

    def shorts(values: list[int]) -> tuple[int, int, bytes]:
        nonlocal extra
        if len(values) <= 2:
            return 3, len(values), struct.pack(f"<{len(values)}H", *values).ljust(4, b"\0")
        offset = extra_at + len(extra)
        extra += struct.pack(f"<{len(values)}H", *values)
        return 3, len(values), struct.pack("<I", offset)

    data_at = extra_at + 4 * channels  # room for the two arrays of channel values
    entries = [
        (256, 4, 1, struct.pack("<I", w)),
        (257, 4, 1, struct.pack("<I", h)),
        (258, *shorts([bits] * channels)),
        (259, 3, 1, struct.pack("<H", 1).ljust(4, b"\0")),  # no compression
        (262, 3, 1, struct.pack("<H", 2 if channels == 3 else 1).ljust(4, b"\0")),  # RGB or black is zero
        (273, 4, 1, struct.pack("<I", data_at)),
        (277, 3, 1, struct.pack("<H", channels).ljust(4, b"\0")),
        (278, 4, 1, struct.pack("<I", h)),
        (279, 4, 1, struct.pack("<I", len(data))),
        (284, 3, 1, struct.pack("<H", 1).ljust(4, b"\0")),  # samples interleaved
        (339, *shorts([sample_format] * channels)),
    ]
    ifd = struct.pack("<H", n_entries) + b"".join(struct.pack("<HHI", t, k, n) + v for t, k, n, v in entries)
    head = b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    path.write_bytes(head + extra.ljust(data_at - extra_at, b"\0") + data)
    return path


def _every_16_bit_rgb() -> np.ndarray:
    """(256, 256, 3) uint16: every value in each channel, in three orders."""
    flat = EVERY_16_BIT.ravel()
    return np.stack([flat, flat[::-1], np.roll(flat, 12345)], axis=-1).reshape(256, 256, 3)


def _files_16(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """16-bit gray and RGB, as PNG and TIFF: {name: (path, samples (256, 256, 3) uint16)}."""
    rgb = _every_16_bit_rgb()
    gray = np.repeat(EVERY_16_BIT[..., None], 3, axis=-1)
    Image.fromarray(EVERY_16_BIT).save(tmp_path / "gray.tif")
    return {
        "gray.png": (write_png(tmp_path / "gray.png", EVERY_16_BIT), gray),
        "gray.tif": (tmp_path / "gray.tif", gray),
        "rgb.png": (write_png(tmp_path / "rgb.png", rgb), rgb),
        "rgb.tif": (write_tiff(tmp_path / "rgb.tif", rgb, 1), rgb),
    }


@pytest.mark.parametrize("decoder", ["libspng where it can", "PIL alone"])
def test_16_bit_samples_keep_their_top_8_bits(tmp_path, monkeypatch, decoder):
    if decoder == "PIL alone":
        monkeypatch.setattr(images, "plain_png", lambda img, mode: False)
    for name, (path, samples) in _files_16(tmp_path).items():
        with Image.open(path) as img:
            assert img.mode == ("I;16" if name.startswith("gray") else "RGB"), name  # what PIL makes of them
        ours = np.asarray(decode_image(path))
        np.testing.assert_array_equal(ours, (samples >> 8).astype(np.uint8), err_msg=name)
        np.testing.assert_array_equal(np.asarray(decode_image(path, "L")), np.asarray(Image.fromarray(ours).convert("L")))
        if name.startswith("rgb"):  # PIL itself reduces 16-bit colour to the top 8 bits
            with Image.open(path) as img:
                np.testing.assert_array_equal(ours, np.asarray(img.convert("RGB")), err_msg=name)
    # an 8-bit image times 257 gives its own pixels back
    eight = _every_16_bit_rgb()[:, :, :] >> 8  # (256, 256, 3), every 8-bit value
    twin = write_png(tmp_path / "twin.png", eight.astype(np.uint16) * 257)
    np.testing.assert_array_equal(np.asarray(decode_image(twin)), eight.astype(np.uint8))


def test_libspng_decodes_16_bit_gray_and_rgb_pngs_and_declines_the_rest(tmp_path, monkeypatch):
    calls = []
    load = png.pyspng.load
    monkeypatch.setattr(png.pyspng, "load", lambda data, format=None: calls.append(format) or load(data, format=format))
    files = _files_16(tmp_path)
    alpha = EVERY_16_BIT[..., None]
    files["ga.png"] = (write_png(tmp_path / "ga.png", np.concatenate([EVERY_16_BIT[..., None], alpha], -1)), None)
    files["rgba.png"] = (write_png(tmp_path / "rgba.png", np.concatenate([_every_16_bit_rgb(), alpha], -1)), None)
    files["rgb_trns.png"] = (write_png(tmp_path / "rgb_trns.png", _every_16_bit_rgb(), (1, 65534, 53191)), None)
    files["gray_trns.png"] = (write_png(tmp_path / "gray_trns.png", EVERY_16_BIT, (300,)), None)
    colour = {"ga.png": np.repeat(EVERY_16_BIT[..., None], 3, -1), "rgba.png": _every_16_bit_rgb(),
              "rgb_trns.png": _every_16_bit_rgb(), "gray_trns.png": np.repeat(EVERY_16_BIT[..., None], 3, -1)}
    libspng = {("gray.png", "RGB"), ("rgb.png", "RGB"), ("rgb_trns.png", "RGB"), ("gray_trns.png", "RGB")}
    for name, (path, _) in files.items():
        for mode in ("RGB", "L"):
            calls.clear()
            decoded = np.asarray(decode_image(path, mode))
            assert calls == (["RGB"] if (name, mode) in libspng else []), (name, mode)
            if name in colour and mode == "RGB":  # alpha and the transparent colour dropped, top 8 bits kept
                np.testing.assert_array_equal(decoded, (colour[name] >> 8).astype(np.uint8), err_msg=name)
    # a damaged 16-bit PNG is not libspng's: PIL refuses it
    path = files["rgb.png"][0]
    data = bytearray(path.read_bytes())
    data[data.find(b"IDAT") + 100] ^= 0x10
    path.write_bytes(bytes(data))
    calls.clear()
    with pytest.raises(DataError, match="cannot read image .*rgb.png"):
        read_image(path)
    assert calls == []


def test_32_bit_integer_samples_by_their_range(tmp_path):
    rng = np.random.default_rng(0)
    signed = rng.integers(0, 2**31, (40, 50), dtype=np.int32)
    signed[0, :2] = [0, 2**31 - 1]
    Image.fromarray(signed).save(tmp_path / "signed.tif")  # PIL writes int32 as signed 32-bit
    unsigned = rng.integers(0, 2**32, (40, 50), dtype=np.uint32)
    unsigned[0, :2] = [0, 2**32 - 1]
    write_tiff(tmp_path / "unsigned.tif", unsigned, 1)
    for name, expected in (("signed.tif", signed >> 23), ("unsigned.tif", unsigned >> 24)):
        ours = np.asarray(decode_image(tmp_path / name))
        np.testing.assert_array_equal(ours, np.repeat(expected[..., None], 3, -1).astype(np.uint8), err_msg=name)
    negative = signed.copy()
    negative[3, 4] = -7
    Image.fromarray(negative).save(tmp_path / "negative.tif")
    with pytest.raises(DataError, match=r"cannot read image .*negative.tif: ValueError: signed 32-bit samples down to -7"):
        read_image(tmp_path / "negative.tif")


def test_float_samples_in_0_1_and_nothing_else(tmp_path):
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(levels.astype(np.float32) / 255).save(tmp_path / "levels.tif")
    with Image.open(tmp_path / "levels.tif") as img:
        assert img.mode == "F" and np.asarray(img.convert("L")).max() == 1  # PIL's convert: all but black
    np.testing.assert_array_equal(np.asarray(decode_image(tmp_path / "levels.tif", "L")), levels)
    np.testing.assert_array_equal(np.asarray(decode_image(tmp_path / "levels.tif")), np.repeat(levels[..., None], 3, -1))
    rng = np.random.default_rng(0)
    values = rng.random((20, 30), dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "values.tif")
    np.testing.assert_array_equal(np.asarray(decode_image(tmp_path / "values.tif", "L")),
                                  np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8))  # nearest level
    for name, bad, shown in (("above.tif", 1.5, r"\[0.5, 1.5\]"), ("below.tif", -0.25, r"\[-0.25, 0.5\]"),
                             ("nan.tif", np.nan, "NaN")):
        samples = np.full((8, 8), 0.5, np.float32)
        samples[2, 3] = bad
        Image.fromarray(samples).save(tmp_path / name)
        with pytest.raises(DataError, match=rf"^cannot read image {tmp_path / name}: ValueError: float samples .*{shown}"):
            read_image(tmp_path / name)


def test_masks_of_any_depth_are_anomalous_where_non_zero(tmp_path):
    truth = np.zeros((6, 7), bool)
    truth[1, 2] = truth[4, 5] = truth[5, 6] = True
    small = np.where(truth, 1, 0)  # the smallest non-zero sample: an 8-bit reduction would lose it
    Image.fromarray(small.astype(np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(small.astype(np.uint16)).save(tmp_path / "gray16.tif")
    Image.fromarray(small.astype(np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray(np.where(truth, 1e-6, 0).astype(np.float32)).save(tmp_path / "float.tif")
    rgb = np.zeros((6, 7, 3), np.uint16)
    rgb[..., 2] = small  # blue 1 of 65535
    write_png(tmp_path / "rgb16.png", rgb)
    write_png(tmp_path / "rgba16.png", np.concatenate([rgb, np.full_like(rgb[..., :1], 65535)], -1))
    expected = np.where(truth, 255, 0).astype(np.uint8)
    for name in ("gray16.png", "gray16.tif", "int32.tif", "float.tif", "rgb16.png", "rgba16.png"):
        mask = decode_mask(tmp_path / name)
        assert mask.mode == "L", name
        np.testing.assert_array_equal(np.asarray(mask), expected, err_msg=name)
    # PIL gives only the top 8 bits of 16-bit colour TIFFs and gray+alpha PNGs (libspng cannot decode
    # those), which would lose such a mask: refused
    write_tiff(tmp_path / "rgb16.tif", rgb, 1)
    with pytest.raises(DataError, match=r"cannot read mask .*rgb16.tif: ValueError: RGB mask with 16-bit samples"):
        read_mask(tmp_path / "rgb16.tif")
    write_png(tmp_path / "ga16.png", np.stack([small, np.full_like(small, 65535)], -1))
    with pytest.raises(DataError, match=r"cannot read mask .*ga16.png: ValueError: 16-bit colour or gray\+alpha PNG"):
        read_mask(tmp_path / "ga16.png")
    # through the data set (no resize, no crop): the item's mask is 255 exactly there
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "image.png")
    item = MVTecDataset([Sample(tmp_path / "image.png", "crack", tmp_path / "gray16.png")], 6, 6)[0]
    assert torch.equal(item[1], torch.from_numpy(expected[:, :6].copy()))


# --------------------------------------------------------------------------- through the CLI


def _twin_trees(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture's weave data twice, file by file the same pictures: as 8-bit RGB PNG, gray PNG,
    gray TIFF and RGB TIFF, and as 16-bit (x257) RGB PNG, gray PNG, gray TIFF, RGB TIFF and float
    TIFF (/255); masks 8-bit and 16-bit (x257)."""
    trees = (tmp_path / "eight", tmp_path / "deep")
    for k, source in enumerate(sorted((FIXTURE / "data" / "weave").rglob("*.png"))):
        relative = source.relative_to(FIXTURE / "data")
        with Image.open(source) as img:
            rgb = np.asarray(img.convert("RGB"))
        if "ground_truth" in relative.parts:
            mask = np.asarray(Image.open(source).convert("L"))
            for tree in trees:
                (tree / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(trees[0] / relative)
            Image.fromarray(mask.astype(np.uint16) * 257).save(trees[1] / relative)
            continue
        gray = np.asarray(Image.fromarray(rgb).convert("L"))
        kind = k % 5
        suffix = ".png" if kind < 2 else ".tif"
        eight, deep = (tree / relative.with_suffix(suffix) for tree in trees)
        for path in (eight, deep):
            path.parent.mkdir(parents=True, exist_ok=True)
        if kind == 0:
            Image.fromarray(rgb).save(eight)
            write_png(deep, rgb.astype(np.uint16) * 257)
        elif kind == 1:
            Image.fromarray(gray).save(eight)
            Image.fromarray(gray.astype(np.uint16) * 257).save(deep)
        elif kind == 2:
            Image.fromarray(gray).save(eight)
            Image.fromarray(gray.astype(np.uint16) * 257).save(deep)
        elif kind == 3:
            Image.fromarray(rgb).save(eight)
            write_tiff(deep, rgb.astype(np.uint16) * 257, 1)
        else:
            Image.fromarray(gray).save(eight)
            Image.fromarray(gray.astype(np.float32) / 255).save(deep)
    return trees


def _common(weights: Path, results_dir: Path) -> list[str]:
    return ["--data.num_workers", "0", "--data.batch_size", "3", "--model.model_paths", f"[{FIXTURE / 'model'}]",
            "--model.backbone_weights", str(weights), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--results_dir", str(results_dir)]


def test_8_bit_16_bit_and_float_twins_give_identical_outputs(tmp_path, resnet18_weights):
    trees = _twin_trees(tmp_path)
    kinds = {p.suffix for p in trees[1].rglob("*.*")}
    assert kinds == {".png", ".tif"}
    outputs = []
    for tree in trees:
        # the same out-of-range float image in both predict folders: skipped, named
        Image.fromarray(np.full((16, 16), 2.0, np.float32)).save(tree / "weave" / "test" / "zz_bright.tif")
        results = tree.parent / f"{tree.name}_results"
        main(["test", *_common(resnet18_weights, results / "test"), "--data.root", str(tree), "--data.categories", "[weave]"])
        main(["predict", *_common(resnet18_weights, results / "predict"), "--data.predict_dir", str(tree / "weave" / "test"),
              "--data.categories", "[weave]", "--model.thresholds_csv", str(results / "test" / "thresholds.csv")])
        outputs.append({name: (results / name).read_bytes() for name in
                        ("test/results.csv", "test/thresholds.csv", "predict/predictions.csv", "predict/skipped.csv")})
    assert outputs[0] == outputs[1]
    with open(tmp_path / "deep_results" / "test" / "results.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["dataset_name"] == "mvtec_weave" and 0 < float(row["instance_auroc"]) and float(row["full_pixel_auroc"]) > 0
    with open(tmp_path / "deep_results" / "predict" / "predictions.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    with open(tmp_path / "deep_results" / "predict" / "skipped.csv", newline="") as handle:
        skipped = list(csv.DictReader(handle))
    assert [s["path"] for s in skipped] == ["zz_bright.tif"] and "float samples in [2, 2]" in skipped[0]["reason"]


def test_float_image_outside_0_1_is_one_line_naming_the_file(tmp_path, resnet18_weights, capsys):
    data = tmp_path / "data"
    shutil.copytree(FIXTURE / "data", data)
    bad = data / "weave" / "test" / "good" / "001.png"
    bad.unlink()
    Image.fromarray(np.full((32, 32), 255.0, np.float32)).save(bad.with_suffix(".tif"))  # 0..255 as floats
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *_common(resnet18_weights, tmp_path / "results"), "--data.root", str(data), "--data.categories", "[weave]"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback (most recent call last)" not in err, err
    assert errors[0].startswith(f"error: cannot read image {bad.with_suffix('.tif')}: ValueError: float samples in [255, 255]: expected [0, 1]")
    assert not (tmp_path / "results" / "results.csv").exists()
