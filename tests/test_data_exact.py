"""Items are bit for bit what the plain PIL + torchvision chain (the original's) computes, in every image mode,
and the pictures the writers draw are exactly the pixels the backbone saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from patchcore_lightning.data import png
from patchcore_lightning.data.folder import ImageFolderDataset
from patchcore_lightning.data.images import IMAGENET_MEAN, IMAGENET_STD, DataError, Sample, decode_image, to_display
from patchcore_lightning.data.mvtec import MVTecDataset


def plain_geometry(resize: int, imagesize: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(imagesize)])


def eight_bit(img: Image.Image) -> Image.Image:
    """16-bit gray reduced to the top 8 bits of its samples (where the original's convert clips it
    to white); every other mode as it is."""
    return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)) if img.mode == "I;16" else img


def plain_image(path: Path, resize: int, imagesize: int) -> torch.Tensor:
    """The original's image: open, convert("RGB"), Resize, CenterCrop, ToTensor, Normalize. (3, S, S)"""
    t = transforms.Compose(
        [plain_geometry(resize, imagesize), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    with Image.open(path) as img:
        return t(eight_bit(img).convert("RGB"))


def plain_mask(path: Path, resize: int, imagesize: int) -> torch.Tensor:
    """The original's mask times 255: open, convert("L"), Resize, CenterCrop; a 16-bit gray mask
    255 where non-zero first (the original's convert clips it). (S, S) uint8"""
    with Image.open(path) as img:
        if img.mode == "I;16":
            img = Image.fromarray(np.where(np.asarray(img) != 0, 255, 0).astype(np.uint8))
        return torch.from_numpy(np.asarray(plain_geometry(resize, imagesize)(img.convert("L")), dtype=np.uint8).copy())


def _noise(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    """Uniform noise plus a ramp: every rounding of the resampling shows. (h, w, channels) uint8"""
    ramp = np.linspace(0, 255, w)[None, :, None]
    return ((rng.integers(0, 256, (h, w, channels)) + ramp) % 256).astype(np.uint8)


def write_modes(folder: Path, h: int, w: int, seed: int = 0, large: bool = False) -> list[Path]:
    """One picture as PNGs of modes RGB and L (MVTec AD's two; only these if ``large``), and LA, RGBA,
    P, P with transparency, 1 and 16-bit gray, RGB with a transparent colour."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(_noise(rng, h, w, 3))
    images = {"rgb": rgb, "l": rgb.convert("L")}
    if not large:
        alpha = Image.fromarray(_noise(rng, h, w, 1)[:, :, 0])
        images |= {
            "la": Image.merge("LA", (rgb.convert("L"), alpha)),
            "rgba": Image.merge("RGBA", (*rgb.split(), alpha)),
            "p": rgb.quantize(64),
            "bilevel": rgb.convert("1"),
            "i16": Image.fromarray(_noise(rng, h, w, 1)[:, :, 0].astype(np.uint16) * 257 + 3),
        }
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(folder / f"{name}.png", compress_level=1)
    if not large:
        images["p_trns"] = images["p"]
        images["p"].save(folder / "p_trns.png", transparency=3)
        images["rgb_trns"] = rgb
        rgb.save(folder / "rgb_trns.png", transparency=(1, 2, 3))
    return [folder / f"{name}.png" for name in images]


# (height, width, resize, imagesize): MVTec sizes resized to 256, non-square, odd crop margins (rounded
# half to even), the whole resized image, upsampled; already at the resize (crop only); a crop larger
# than the resized image (padded).
GEOMETRIES = [
    (1024, 1024, 256, 224),
    (900, 900, 256, 224),
    (160, 200, 128, 112),
    (75, 60, 32, 29),
    (50, 50, 32, 32),
    (24, 24, 32, 27),
    (64, 91, 32, 28),
    (48, 48, 40, 33),
    (32, 45, 32, 24),
    (30, 30, 32, 40),
]


@pytest.mark.parametrize(("h", "w", "resize", "imagesize"), GEOMETRIES)
def test_items_equal_the_plain_chain_in_every_mode(tmp_path, h, w, resize, imagesize):
    images = write_modes(tmp_path / "img", h, w, large=h > 500)
    masks = write_modes(tmp_path / "mask", h, w, seed=1, large=h > 500)
    samples = [Sample(image, "crack", mask) for image, mask in zip(images, masks)]
    dataset = MVTecDataset(samples, resize, imagesize)
    for i, sample in enumerate(samples):
        image, mask, _, _ = dataset[i]
        assert torch.equal(image, plain_image(sample.image, resize, imagesize)), sample.image.name
        assert torch.equal(mask, plain_mask(sample.mask, resize, imagesize)), sample.mask.name
        assert image.is_contiguous() and image.dtype == torch.float32 and mask.dtype == torch.uint8
        with Image.open(sample.image) as img:
            shown = np.asarray(plain_geometry(resize, imagesize)(eight_bit(img).convert("RGB")))
        np.testing.assert_array_equal(to_display(image).numpy(), shown)


@pytest.mark.parametrize(("h", "w", "resize", "imagesize"), GEOMETRIES[2:])
def test_folder_items_equal_the_plain_chain_in_every_format(tmp_path, h, w, resize, imagesize):
    pngs = write_modes(tmp_path / "png", h, w)
    rgb = Image.open(pngs[0]).convert("RGB")
    for suffix in ("jpg", "bmp", "tif"):
        rgb.save(tmp_path / f"rgb.{suffix}")
        rgb.convert("L").save(tmp_path / f"l.{suffix}")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    dataset = ImageFolderDataset(tmp_path, resize, imagesize)
    assert len(dataset) == len(pngs) + 7
    for i, path in enumerate(dataset.paths):
        image, index, reason = dataset[i]
        assert (index, reason) == (i, "")
        assert torch.equal(image, plain_image(path, resize, imagesize)), path.name
        with Image.open(path) as img:
            shown = np.asarray(plain_geometry(resize, imagesize)(eight_bit(img).convert("RGB")))
        np.testing.assert_array_equal(to_display(image).numpy(), shown)


def test_display_recovers_every_pixel_value():
    values = torch.arange(256, dtype=torch.uint8)
    pixels = torch.stack(torch.meshgrid(values, values, indexing="ij")).flatten(1)[:, :, None]  # every pair, 2 channels
    rgb = torch.cat([pixels, pixels[:1].flip(1)]).expand(3, 256 * 256, 2)  # (3, 65536, 2) uint8
    image = Image.fromarray(rgb.permute(1, 2, 0).numpy().copy())
    normalised = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)
    assert torch.equal(to_display(normalised), rgb.permute(1, 2, 0))
    batch = torch.stack([normalised, normalised])  # (B, 3, H, W) → (B, H, W, 3)
    assert to_display(batch).shape == (2, 256 * 256, 2, 3)


def test_unreadable_files_fail_with_the_plain_chains_message(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in write_modes(tmp_path / "good", 40, 40)[:2]:  # RGB, L
        data = path.read_bytes()
        (bad / path.name).write_bytes(data[: len(data) // 2])
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    folder = ImageFolderDataset(bad, 32, 32)
    assert len(folder) == 3
    for i, path in enumerate(folder.paths):
        with pytest.raises(Exception) as plain:
            plain_image(path, 32, 32)
        reason = f"{type(plain.value).__name__}: {plain.value}"
        assert folder[i][2] == reason and not folder[i][0].any()
        dataset = MVTecDataset([Sample(path, "good", None)], 32, 32)
        with pytest.raises(DataError) as ours:
            dataset[0]
        assert str(ours.value) == f"cannot read image {path}: {reason}"


def test_plain_pngs_are_decoded_by_libspng_to_pils_pixels(tmp_path, monkeypatch):
    decoded = []
    load = png.pyspng.load
    monkeypatch.setattr(png.pyspng, "load", lambda data, format: decoded.append(format) or load(data, format=format))
    paths = {p.stem: p for p in write_modes(tmp_path, 37, 53)}
    for mode in ("RGB", "L"):
        for name, path in paths.items():
            decoded.clear()
            ours = decode_image(path, mode)
            with Image.open(path) as img:
                expected = eight_bit(img).convert(mode)
            assert ours.mode == mode and np.array_equal(np.asarray(ours), np.asarray(expected)), (name, mode)
            plain = (name, mode) in {("rgb", "RGB"), ("rgb_trns", "RGB"), ("l", "L"), ("i16", "RGB")}
            assert decoded == ([mode] if plain else []), (name, mode)


def test_a_damaged_png_is_never_decoded_to_other_pixels(tmp_path):
    """libspng (as pyspng runs it) ignores the CRCs; a damaged plain PNG goes to PIL, which refuses it."""
    path = write_modes(tmp_path, 64, 64, large=True)[0]  # RGB
    data = bytearray(path.read_bytes())
    data[data.find(b"IDAT") + 100] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(OSError) as plain:
        with Image.open(path) as img:
            img.convert("RGB")
    with pytest.raises(DataError) as ours:
        MVTecDataset([Sample(path, "good", None)], 32, 32)[0]
    assert str(ours.value) == f"cannot read image {path}: {type(plain.value).__name__}: {plain.value}"
