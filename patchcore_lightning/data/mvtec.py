"""MVTec AD's layout: ``<root>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}``.

Test images are ordered by anomaly type (sorted), then file name (sorted), as the original's.
"""

from __future__ import annotations

import os
from pathlib import Path

from .images import IMAGE_EXTENSIONS, DataError, Sample, SampleDataset, images_in

__all__ = ["MVTecDataset", "list_samples"]

# One category's split as tensors (the data set class every layout shares).
MVTecDataset = SampleDataset


def list_samples(root: str | os.PathLike, category: str, split: str = "test") -> list[Sample]:
    """The samples of one category's split, in the original's order, with masks paired by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    category_dir = root / category
    if not category_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"category folder not found: {category_dir} (categories in {root}: {found})")
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise DataError(f"no {split}/ folder in {category_dir}")
    samples: list[Sample] = []
    for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        anomaly = type_dir.name
        images = images_in(type_dir)
        if split != "test" or anomaly == "good":
            samples += [Sample(image, anomaly, None) for image in images]
            continue
        mask_dir = category_dir / "ground_truth" / anomaly
        masks = {p.stem: p for p in images_in(mask_dir)} if mask_dir.is_dir() else {}
        for image in images:
            mask = masks.pop(f"{image.stem}_mask", None)
            if mask is None:
                raise DataError(
                    f"no ground-truth mask for {image.relative_to(category_dir)} "
                    f"(looked for {image.stem}_mask.* in {mask_dir})"
                )
            samples.append(Sample(image, anomaly, mask))
        if masks:
            raise DataError(f"{mask_dir}: masks without a test image: {sorted(masks)}")
    if not samples:
        raise DataError(f"no images in {split_dir} (looked for {', '.join(IMAGE_EXTENSIONS)} in its subfolders)")
    return samples
