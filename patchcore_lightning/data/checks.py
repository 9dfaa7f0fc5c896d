"""Every category of a run checked before any work: its samples listed, every file's header read.

A run over many categories should not fail in its fifth category for a typo in the run's
arguments or a damaged file: ``check_split`` lists a category's split as the data module will
(``list_split``: layout, split file, masks paired by name) and opens every image and mask far enough
to read its size (the file's header, not its pixels), so that a missing category, an empty or
foreign file, or a mask whose size differs from its image is found up front. A file whose pixels
are damaged past its header is still found when it is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .datamodule import list_split
from .images import DataError

__all__ = ["check_split"]

# Problems of one file kind shown per category; the rest are counted ("and 12 more").
SHOWN_PER_CATEGORY = 3


def _header_size(path: Path, problems: list[str]) -> tuple[int, int] | None:
    """The (width, height) in ``path``'s header; None, with a problem noted, where it cannot be read."""
    try:
        if path.stat().st_size == 0:
            problems.append(f"cannot read image {path}: empty file")
            return None
        with Image.open(path) as img:  # reads the header only
            return img.size
    except Exception as err:  # not an image, unreadable, or refused by PIL: named, not raised
        problems.append(f"cannot read image {path}: {type(err).__name__}: {err}")
        return None


def check_split(benchmark: str, root: str | os.PathLike, category: str, split: str) -> list[str]:
    """What is wrong with ``category``'s ``split`` (``train`` or ``test``), one message per problem;
    empty when it can be run. Cheap: file names, sizes and image headers, no pixels."""
    try:
        samples = list_split(benchmark, os.fspath(root), category, split)
    except DataError as err:
        return [str(err)]
    problems: list[str] = []
    for sample in samples:
        size = _header_size(sample.image, problems)
        if sample.mask is None:
            continue
        mask_size = _header_size(sample.mask, problems)
        if size is not None and mask_size is not None and mask_size != size:
            problems.append(
                f"mask {sample.mask} is {mask_size[0]}x{mask_size[1]}, its image {sample.image} {size[0]}x{size[1]}"
            )
    if len(problems) > SHOWN_PER_CATEGORY:
        problems = [*problems[:SHOWN_PER_CATEGORY], f"and {len(problems) - SHOWN_PER_CATEGORY} more such files"]
    return problems
