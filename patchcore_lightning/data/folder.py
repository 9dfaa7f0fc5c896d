"""A folder of unlabelled images (any layout, searched recursively), for ``predict``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .mvtec import _IMAGE_MODES, IMAGE_EXTENSIONS, DataError, _read, _ResizeCrop, _to_normalized_tensor

__all__ = ["ImageFolderDataset", "list_images"]


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` (png, jpg/jpeg, bmp, tif/tiff, any case), in sorted path order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"predict_dir not found: {root}")
    images = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not images:
        raise DataError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return images


class ImageFolderDataset(Dataset):
    """Items: image (3, S, S) (zeros if unreadable), index, and "" or the reason it could not be read.

    An unreadable file does not stop the run: the model skips it and ``predict`` lists it in
    skipped.csv. Grayscale, palette and RGBA images are converted to RGB.
    """

    def __init__(self, root: str | os.PathLike, resize: int, imagesize: int) -> None:
        self.root = Path(root)
        self.paths = list_images(self.root)
        self.imagesize = imagesize
        self.geometry = _ResizeCrop(resize, imagesize)

    def __len__(self) -> int:
        return len(self.paths)

    def relative(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def display_image(self, index: int) -> np.ndarray:
        """The image as the backbone saw it (resized and cropped), un-normalised. (S, S, 3) uint8"""
        image = self.geometry(_read(self.paths[index], _IMAGE_MODES))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = _read(self.paths[index], _IMAGE_MODES)
        except Exception as err:  # unreadable or truncated: reported, not fatal
            return torch.zeros(3, self.imagesize, self.imagesize), index, f"{type(err).__name__}: {err}"
        return _to_normalized_tensor(self.geometry(image)), index, ""
