"""Reading images and masks, and the transforms every data set shares: the original's, unchanged.

An image is ``Image.open(path).convert("RGB")`` (plain PNGs decoded by libspng, which gives PIL's
pixels faster: ``png.py``), ``Resize(resize)`` (shorter side, bilinear), ``CenterCrop(imagesize)``,
``ToTensor`` and ImageNet ``Normalize``: (3, S, S) float32. A mask is ``convert("L")`` with the same
resize and crop, kept as uint8 (S, S): 0..255, exactly the original's float mask times 255, so a
pixel is anomalous where it is 255 (the original's 1.0).

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

from .png import decode_png, plain_png

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
    "read_image",
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


def decode_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """The pixels of ``Image.open(path).convert(mode)``: plain PNGs decoded by libspng (``png.py``),
    everything else by PIL. Raises what PIL raises for a file it cannot read."""
    with Image.open(path) as img:
        if plain_png(img, mode):
            decoded = decode_png(Path(path).read_bytes(), mode)
            if decoded is not None:
                return decoded
        return img.convert(mode)


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """``decode_image``; an unreadable or truncated file is a DataError naming it."""
    try:
        return decode_image(path, mode)
    except Exception as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


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
        mask = read_image(sample.mask, "L")
        if self.binarize_masks:
            mask = mask.point(lambda v: 255 if v else 0)
        if mask.size != image.size:
            raise DataError(
                f"mask {sample.mask} is {mask.size[0]}x{mask.size[1]}, "
                f"its image {sample.image} {image.size[0]}x{image.size[1]}"
            )
        return self.transform.image(image), self.transform.mask(mask), sample.label, index
