"""A folder of unlabelled images (any layout, searched recursively), for ``predict``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, PADDING_INDEX, DataError, ImageTransform, decode_image

__all__ = ["ImageFolderDataset", "list_images", "scan_folder"]


def _identity(path: Path) -> tuple[int, int]:
    """The folder ``path`` leads to (symlinks followed), as (device, inode)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def scan_folder(root: str | os.PathLike) -> tuple[list[Path], dict[Path, str]]:
    """Every image file under ``root`` (png, jpg/jpeg, bmp, tif/tiff, any case), symlinked files and
    folders followed, and what could not be listed: {path: reason} for a symlink that leads back to
    a folder it is in (a loop, not followed), a broken symlink with an image's name, and a subfolder
    that cannot be read. Both in no particular order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"predict_dir not found: {root}")
    images: list[Path] = []
    problems: dict[Path, str] = {}
    stack = [(root, frozenset({_identity(root)}))]  # a folder and the folders it is in
    while stack:
        folder, ancestors = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            if folder == root:
                raise DataError(f"cannot list predict_dir {root}: {err.strerror or err}") from None
            problems[folder] = f"cannot list folder: {type(err).__name__}: {err.strerror or err}"
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir():  # a symlink to a folder too
                identity = _identity(path)
                if identity in ancestors:
                    problems[path] = f"symlink loop: leads to {os.path.realpath(path)}, a folder it is in; not followed"
                else:
                    stack.append((path, ancestors | {identity}))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    images.append(path)
                elif entry.is_symlink() and not path.exists():
                    problems[path] = f"broken symlink: {os.readlink(path)} does not exist"
    return images, problems


def _listing(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """``scan_folder``, the images in sorted path order; no image is an error."""
    images, problems = scan_folder(root)
    if not images:
        also = f"; not read: {', '.join(sorted(p.relative_to(root).as_posix() for p in problems))}" if problems else ""
        raise DataError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively{also})")
    return sorted(images, key=lambda p: p.relative_to(root).as_posix()), problems


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` (``scan_folder``), in sorted path order."""
    return _listing(Path(root))[0]


class ImageFolderDataset(Dataset):
    """Items: image (3, S, S) (zeros if unreadable), index, and "" or the reason it could not be read.

    An unreadable file does not stop the run: the model skips it and ``predict`` lists it in
    skipped.csv, as it does what ``scan_folder`` could not list (symlink loops, broken symlinks,
    unreadable subfolders), in the same sorted path order. Grayscale, palette, CMYK and RGBA images
    are converted to RGB, deeper samples as ``images.py`` says.
    """

    def __init__(self, root: str | os.PathLike, resize: int, imagesize: int) -> None:
        self.root = Path(root)
        images, problems = _listing(self.root)
        self.paths = sorted([*images, *problems], key=lambda p: p.relative_to(self.root).as_posix())
        self.problems = {i: problems[p] for i, p in enumerate(self.paths) if p in problems}
        self.transform = ImageTransform(resize, imagesize)

    def __len__(self) -> int:
        return len(self.paths)

    def relative(self, index: int) -> str:
        """The image's path relative to the folder, with forward slashes."""
        return self.paths[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        if index == PADDING_INDEX:
            return self.transform.placeholder()[0], PADDING_INDEX, ""
        if index in self.problems:
            return self.transform.placeholder()[0], index, self.problems[index]
        try:
            image = decode_image(self.paths[index])
        except Exception as err:  # unreadable or truncated: reported, not fatal
            return self.transform.placeholder()[0], index, f"{type(err).__name__}: {err}"
        return self.transform.image(image), index, ""
