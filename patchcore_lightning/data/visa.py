"""VisA's layout, as distributed: the split file ``<root>/split_csv/1cls.csv``.

Its columns are ``object,split,label,image,mask``: the category, ``train`` or ``test``, ``normal`` or
``anomaly``, and the image's and mask's paths relative to the root (images
``<category>/Data/Images/{Normal,Anomaly}/*.JPG``, masks ``<category>/Data/Masks/Anomaly/*.png``; no
mask for normal rows). A mask pixel is anomalous wherever it is non-zero: the data set binarises the
masks to 0/255 before the usual resize (``SampleDataset(binarize_masks=True)``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .images import DataError, Sample

__all__ = ["SPLIT_FILE", "list_samples"]

SPLIT_FILE = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")


def _read_split_file(root: Path) -> list[dict[str, str]]:
    path = root / SPLIT_FILE
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    if not path.is_file():
        raise DataError(f"no VisA split file {path} (VisA's layout: {SPLIT_FILE} under the data root)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (expected {','.join(_COLUMNS)})")
        return list(reader)


def list_samples(root: str | os.PathLike, category: str, split: str = "test") -> list[Sample]:
    """The samples of one category's split (``train`` or ``test``) as the split file lists them,
    ordered by label (normal first), then path."""
    root = Path(root)
    rows = _read_split_file(root)
    split_file = root / SPLIT_FILE
    found = sorted({row["object"] for row in rows})
    if category not in found:
        raise DataError(f"category {category!r} is not in {split_file} (it lists {found})")
    samples = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != category or row["split"] != split:
            continue
        label = row["label"].strip().lower()
        if label not in ("normal", "anomaly"):
            raise DataError(f"{split_file} line {line}: label must be normal or anomaly, got {row['label']!r}")
        if split == "train" and label != "normal":
            raise DataError(f"{split_file} line {line}: an anomalous image in the train split; a memory bank holds normal images only")
        image = root / row["image"]
        if not image.is_file():
            raise DataError(f"{split_file} line {line} names a missing image: {image}")
        mask = None
        if label == "anomaly" and split == "test":
            if not row["mask"].strip():
                raise DataError(f"{split_file} line {line}: anomalous image {image} has no mask")
            mask = root / row["mask"]
            if not mask.is_file():
                raise DataError(f"{split_file} line {line} names a missing mask: {mask}")
        samples.append(Sample(image, label, mask, int(label == "anomaly")))
    if not samples:
        raise DataError(f"{split_file} lists no {split} images of {category!r}")
    return sorted(samples, key=lambda s: (s.label, s.image.as_posix()))
