"""A folder of unlabelled images (any layout, searched recursively), for ``predict``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, PADDING_INDEX, DataError, ImageTransform, decode_image

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
    skipped.csv. Grayscale, palette, CMYK and RGBA images are converted to RGB.
    """

    def __init__(self, root: str | os.PathLike, resize: int, imagesize: int) -> None:
        self.root = Path(root)
        self.paths = list_images(self.root)
        self.transform = ImageTransform(resize, imagesize)

    def __len__(self) -> int:
        return len(self.paths)

    def relative(self, index: int) -> str:
        """The image's path relative to the folder, with forward slashes."""
        return self.paths[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        if index == PADDING_INDEX:
            return self.transform.placeholder()[0], PADDING_INDEX, ""
        try:
            image = decode_image(self.paths[index])
        except Exception as err:  # unreadable or truncated: reported, not fatal
            return self.transform.placeholder()[0], index, f"{type(err).__name__}: {err}"
        return self.transform.image(image), index, ""
