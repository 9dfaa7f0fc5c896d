"""Reading images and masks, and the transforms every data set shares: the original's, unchanged.

An image is ``Image.open(path).convert("RGB")`` (plain PNGs decoded by libspng, which gives PIL's
pixels faster: ``png.py``), ``Resize(resize)`` (shorter side, bilinear), ``CenterCrop(imagesize)``,
``ToTensor`` and ImageNet ``Normalize``: (3, S, S) float32. A mask is ``convert("L")`` with the same
resize and crop, kept as uint8 (S, S): 0..255, exactly the original's float mask times 255, so a
pixel is anomalous where it is 255 (the original's 1.0).

Samples deeper than 8 bits become the 8-bit pixels the rest of the chain (PIL's resize included)
works on, each by its range, so that an image and its deeper twin give the same pixels:
- integer samples (16-bit gray ``I;16``, 16-bit colour, 32-bit ``I``) keep their top 8 bits:
  ``v >> 8`` for 16 bits (``v >> 24`` unsigned and ``v >> 23`` signed 32 bits, negative samples
  refused). PIL and libspng reduce 16-bit colour PNGs and TIFFs so; an 8-bit image times 257 gives
  its own pixels back.
- float samples (``F``) must lie in [0, 1] and become ``round(255 v)``; NaN or a value outside is
  an error naming the file (there is no range to scale them by).
A mask deeper than 8 bits is anomalous wherever its sample is non-zero (0 or 255 before the resize).

``to_display`` turns a normalised image back into the uint8 pixels it was made from, so that the
writers draw what the backbone saw without decoding the file again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .png import decode_png, plain_png, png_sample_depth, png_samples

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PADDING_INDEX",
    "DataError",
    "ImageTransform",
    "Sample",
    "SampleDataset",
    "decode_image",
    "images_in",
    "decode_mask",
    "read_image",
    "read_mask",
    "to_display",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The index of a placeholder item: a DDP rank left without images gets one, so that it still runs
# the loop's hooks (and joins the metric gather); the model skips it.
PADDING_INDEX = -1


class DataError(ValueError):
    """A data set that does not follow its layout, or a file in it that cannot be read."""


def images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# Modes whose samples are 8 bits (or fewer) as PIL holds them: converted by PIL, as the original.
_EIGHT_BIT_MODES = frozenset(
    {"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)


def _tag(img: Image.Image, tag: int, default: int) -> int:
    """The first value of a TIFF tag (BitsPerSample 258, SampleFormat 339), or ``default``."""
    value = img.tag_v2.get(tag, default) if hasattr(img, "tag_v2") else default
    return int(value[0] if isinstance(value, tuple) else value)


def _integer_depth(img: Image.Image) -> tuple[int, bool]:
    """(bits, signed) of the samples of an image PIL holds as ``I;16*`` or ``I`` (int32)."""
    if img.mode.startswith("I;16"):
        return 16, False
    if img.format == "TIFF":
        return _tag(img, 258, 32), _tag(img, 339, 1) == 2  # SampleFormat 2: signed integers
    if img.format == "PNG":
        return 16, False  # PNG's deepest gray
    raise ValueError(f"32-bit integer samples of a {img.format} file: their range is unknown")


def _integer_samples(img: Image.Image) -> tuple[np.ndarray, int]:
    """The samples of an ``I;16*`` or ``I`` image as non-negative integers (H, W), and their bits."""
    bits, signed = _integer_depth(img)
    samples = np.asarray(img)  # (H, W) uint16 or int32
    if signed:
        low = int(samples.min())
        if low < 0:
            raise ValueError(f"signed {bits}-bit samples down to {low}: expected intensities >= 0")
        return samples, bits - 1
    if samples.dtype == np.int32:
        samples = samples.view(np.uint32)  # PIL holds unsigned 32-bit samples in int32
    return samples, bits


def _float_samples(img: Image.Image) -> np.ndarray:
    """The samples of an ``F`` image (H, W) float32, checked to be numbers."""
    samples = np.asarray(img, dtype=np.float32)
    if np.isnan(samples).any():
        raise ValueError("float samples with NaN: expected numbers in [0, 1]")
    return samples


def _to_eight_bits(img: Image.Image) -> Image.Image:
    """``img`` (opened) with 8-bit samples: as it is in an 8-bit mode, else by its range (module doc)."""
    if img.mode in _EIGHT_BIT_MODES:
        return img
    if img.mode == "F":
        samples = _float_samples(img)
        low, high = float(samples.min()), float(samples.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float samples in [{low:g}, {high:g}]: expected [0, 1] "
                f"(scale the image to [0, 1], or save it as 8 or 16-bit integers)"
            )
        return Image.fromarray(np.rint(samples.astype(np.float64) * 255).astype(np.uint8))  # (H, W) L
    if img.mode == "I" or img.mode.startswith("I;16"):
        samples, bits = _integer_samples(img)
        return Image.fromarray((samples >> max(bits - 8, 0)).astype(np.uint8))  # (H, W) L: the top 8 bits
    raise ValueError(f"image mode {img.mode} is not supported")


def decode_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """The 8-bit pixels of the image in ``mode``: ``Image.open(path).convert(mode)`` for 8-bit
    samples, deeper ones reduced by their range first (module doc). Plain PNGs are decoded by
    libspng (``png.py``), everything else by PIL. Raises what PIL raises for a file it cannot read,
    and ValueError for samples without a range (float outside [0, 1], negative integers)."""
    with Image.open(path) as img:
        return _decode_opened(img, path, mode)


def _decode_opened(img: Image.Image, path: str | os.PathLike, mode: str) -> Image.Image:
    if plain_png(img, mode):
        decoded = decode_png(Path(path).read_bytes(), mode)
        if decoded is not None:
            return decoded
    return _to_eight_bits(img).convert(mode)


def _deep_colour(img: Image.Image) -> bool:
    """``img`` (opened, not loaded) holds colour or gray+alpha samples deeper than 8 bits, which PIL
    reduces to their top 8 bits."""
    if img.mode not in _EIGHT_BIT_MODES:
        return False
    if img.format == "PNG":
        return png_sample_depth(img) > 8
    return img.format == "TIFF" and _tag(img, 258, 8) > 8


def decode_mask(path: str | os.PathLike) -> Image.Image:
    """A mask as 8-bit gray (mode L): an 8-bit mask as ``convert("L")`` (the original's), a deeper
    one 255 wherever its sample is non-zero, else 0. Raises as ``decode_image``."""
    with Image.open(path) as img:
        if img.mode in ("F", "I") or img.mode.startswith("I;16"):
            samples = _float_samples(img) if img.mode == "F" else _integer_samples(img)[0]
            return Image.fromarray(np.where(samples != 0, 255, 0).astype(np.uint8))  # (H, W) L
        if _deep_colour(img):
            if img.format != "PNG":
                raise ValueError(
                    f"{img.mode} mask with {_tag(img, 258, 8)}-bit samples: PIL reads only their top 8 bits; "
                    f"save the mask as 8-bit or as 16-bit gray"
                )
            samples = png_samples(Path(path).read_bytes())
            if samples is None:
                raise ValueError(
                    "16-bit colour or gray+alpha PNG mask that libspng cannot decode (a chunk's CRC fails, damaged "
                    "data, or gray+alpha); save the mask as 8-bit or as 16-bit gray"
                )
            colour = samples[..., :-1]  # (H, W, 3) or (H, W, 1): libspng gives RGBA16 or GA16
            return Image.fromarray(np.where(colour.any(axis=-1), 255, 0).astype(np.uint8))  # (H, W) L
        return _decode_opened(img, path, "L")


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """``decode_image``; an unreadable or truncated file is a DataError naming it."""
    try:
        return decode_image(path, mode)
    except Exception as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


def read_mask(path: str | os.PathLike) -> Image.Image:
    """``decode_mask``; an unreadable or truncated file is a DataError naming it."""
    try:
        return decode_mask(path)
    except Exception as err:
        raise DataError(f"cannot read mask {path}: {type(err).__name__}: {err}") from None


class ImageTransform:
    """The original's test transforms: PIL image → normalised image (3, S, S), PIL mask → uint8 mask (S, S)."""

    def __init__(self, resize: int, imagesize: int) -> None:
        self.imagesize = imagesize
        self.geometry = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(imagesize)])
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def image(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.geometry(img))  # (3, S, S) float32

    def mask(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(self.geometry(img), dtype=np.uint8))  # (S, S) uint8

    def placeholder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A black image and an empty mask, for items that carry no picture."""
        S = self.imagesize
        return torch.zeros(3, S, S), torch.zeros(S, S, dtype=torch.uint8)


def to_display(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images (..., 3, S, S) → the uint8 pixels they came from, (..., S, S, 3).

    Exact: undoing the normalisation in float32 lands within ~1e-4 of the original integer, far
    inside the 0.5 that rounding tolerates.
    """
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((images.float() * std + mean) * 255).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.movedim(-3, -1)


@dataclass(frozen=True)
class Sample:
    """One image of a split: its path, its type (its folder: ``good``, a defect's name, ...), its
    ground-truth mask (or None) and its label (1 anomalous; by default: the type is not ``good``)."""

    image: Path
    anomaly: str
    mask: Path | None
    label: int = -1

    def __post_init__(self) -> None:
        if self.label == -1:
            object.__setattr__(self, "label", int(self.anomaly != "good"))

    @property
    def name(self) -> str:
        """``<anomaly>_<file stem>``, the name of its segmentation image."""
        return f"{self.anomaly}_{self.image.stem}"


class SampleDataset(Dataset):
    """Items: image (3, S, S) float32 ImageNet-normalised, mask (S, S) uint8, label, index.

    A sample without a mask gets an all-zero mask. ``binarize_masks``: every non-zero mask pixel is
    made 255 before the resize (masks that mark defects with small values, as VisA's).
    ``PADDING_INDEX`` gives a placeholder item.
    """

    def __init__(self, samples: list[Sample], resize: int, imagesize: int, binarize_masks: bool = False) -> None:
        self.samples = samples
        self.transform = ImageTransform(resize, imagesize)
        self.binarize_masks = binarize_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if index == PADDING_INDEX:
            return *self.transform.placeholder(), 0, PADDING_INDEX
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.mask is None:
            return self.transform.image(image), self.transform.placeholder()[1], sample.label, index
        mask = read_mask(sample.mask)
        if self.binarize_masks:
            mask = mask.point(lambda v: 255 if v else 0)
        if mask.size != image.size:
            raise DataError(
                f"mask {sample.mask} is {mask.size[0]}x{mask.size[1]}, "
                f"its image {sample.image} {image.size[0]}x{image.size[1]}"
            )
        return self.transform.image(image), self.transform.mask(mask), sample.label, index
