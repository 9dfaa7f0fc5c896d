"""libspng's PNG decoding (data/png.py): PIL's pixels, taken only where unambiguous, damaged files to PIL."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_lightning.data import png
from patchcore_lightning.data.mvtec import DataError, MVTecDataset, Sample, _read

from .test_data_exact import plain_image, write_modes

pytestmark = pytest.mark.skipif(png.pyspng is None, reason="pyspng not installed")


def _pil_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(img)


def _chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of every chunk."""
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append((pos, kind, length))
        pos += 12 + length
    return out


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("png")
    paths = {p.stem: p for p in write_modes(folder, 37, 53)}  # odd sizes: rows not multiples of anything
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (61, 45, 3), dtype=np.uint8)
    extra = {
        # every filter type PIL's encoder picks with optimize, several IDAT chunks, tRNS on RGB and L
        "rgb_optimized": (Image.fromarray(rgb), {"optimize": True}),
        "rgb_trns": (Image.fromarray(rgb), {"transparency": (1, 2, 3)}),
        "l_trns": (Image.fromarray(rgb[:, :, 0]), {"transparency": 7}),
        "l4": (Image.fromarray(rgb[:, :, 0] // 16 * 17), {"bits": 4}),
        "rgb_flat": (Image.new("RGB", (64, 48), (10, 200, 30)), {"compress_level": 9}),
    }
    for name, (img, options) in extra.items():
        img.save(folder / f"{name}.png", **options)
        paths[name] = folder / f"{name}.png"
    Image.fromarray(rgb).save(folder / "rgb.jpg", quality=90)
    paths["jpeg"] = folder / "rgb.jpg"
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(folder / "apng.png", save_all=True, append_images=frames[1:])
    paths["apng"] = folder / "apng.png"
    return paths


FAST = {"rgb", "l", "rgb_optimized", "rgb_trns", "l_trns", "rgb_flat"}


def test_fast_case_is_8_bit_rgb_and_gray_only(pngs):
    for name, path in pngs.items():
        with Image.open(path) as img:
            assert png.fast_case(img) == (name in FAST), name
    assert {"l4", "p", "p_trns", "la", "rgba", "bilevel", "i16", "jpeg", "apng"} <= set(pngs) - FAST


def test_libspng_gives_pils_pixels(pngs):
    for name in FAST:
        with Image.open(pngs[name]) as img:
            ours = png.load_png(img, pngs[name])
            assert ours.mode == img.mode
        np.testing.assert_array_equal(np.asarray(ours), _pil_pixels(pngs[name]), err_msg=name)


def test_read_decodes_the_fast_case_with_libspng(pngs, monkeypatch):
    calls = []
    load = png.pyspng.load
    monkeypatch.setattr(png.pyspng, "load", lambda data, format=None: calls.append(format) or load(data, format))
    for name, path in pngs.items():
        ours = np.asarray(_read(path, ("RGB", "L")))
        np.testing.assert_array_equal(ours, np.asarray(_plain_read(path)), err_msg=name)
    assert sorted(calls) == sorted("L" if name.startswith("l") else "RGB" for name in FAST)


def _plain_read(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB") if img.mode not in ("RGB", "L") else img.copy()


def test_dataset_items_equal_the_plain_chain_with_and_without_pyspng(pngs, monkeypatch):
    samples = [Sample(pngs[name], "good", None) for name in sorted(FAST)]
    with_spng = [MVTecDataset(samples, 40, 32)[i][0] for i in range(len(samples))]
    monkeypatch.setattr(png, "pyspng", None)
    without = [MVTecDataset(samples, 40, 32)[i][0] for i in range(len(samples))]
    for sample, a, b in zip(samples, with_spng, without):
        assert torch.equal(a, b)
        assert torch.equal(a, plain_image(sample.image, 40, 32))


def test_check_chunks(pngs, tmp_path):
    data = pngs["rgb_optimized"].read_bytes()
    png.check_chunks(data)  # intact
    idat = next((pos, length) for pos, kind, length in _chunks(data) if kind == b"IDAT")
    flipped = bytearray(data)
    flipped[idat[0] + 8 + idat[1] // 2] ^= 0x40  # one bit in the compressed pixels
    with pytest.raises(ValueError, match=r"broken PNG file: chunk b'IDAT' at byte \d+ fails its CRC"):
        png.check_chunks(bytes(flipped))
    with pytest.raises(ValueError, match=r"truncated PNG"):
        png.check_chunks(data[: len(data) - 20])
    with pytest.raises(ValueError, match=r"not a PNG file"):
        png.check_chunks(b"GIF89a" + data[6:])


def test_damaged_files_are_left_to_pil(pngs, tmp_path):
    # a bit flipped in the pixels (the CRC now fails) and a truncated file: PIL's pixels or PIL's error
    data = pngs["rgb"].read_bytes()
    idat = next((pos, length) for pos, kind, length in _chunks(data) if kind == b"IDAT")
    flipped = bytearray(data)
    flipped[idat[0] + 8 + idat[1] // 2] ^= 0x40
    cases = {"flipped.png": bytes(flipped), "truncated.png": data[: len(data) * 2 // 3]}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        dataset = MVTecDataset([Sample(path, "good", None)], 40, 32)
        try:
            expected = plain_image(path, 40, 32)
        except Exception as err:  # noqa: BLE001  (whatever PIL raises is the expected message)
            with pytest.raises(DataError) as ours:
                dataset[0]
            assert str(ours.value) == f"cannot read image {path}: {type(err).__name__}: {err}"
        else:
            assert torch.equal(dataset[0][0], expected), name
