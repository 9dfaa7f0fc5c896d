"""MVTec AD's layout, and the benchmarks that share its shape (MPDD, BTAD, MVTec AD 2, your own folders).

MVTec AD: ``<root>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}``. The
others differ in a few names (``Layout``). Test images are ordered by type (sorted), then file name
(sorted), as the original's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS, DataError, Sample, SampleDataset, images_in

__all__ = ["BTAD", "FOLDER", "MPDD", "MVTEC_AD", "MVTEC_AD2", "Layout", "MVTecDataset", "list_samples"]

# One category's split as tensors (the data set class every layout shares).
MVTecDataset = SampleDataset


@dataclass(frozen=True)
class Layout:
    """Where a benchmark of MVTec AD's shape keeps a category's images and masks.

    Args:
        train: folder (in the category folder) whose ``normal`` subfolder holds the training images.
        test: folder whose subfolders hold the test images, one per type.
        ground_truth: folder (in the category folder) whose ``<type>`` subfolders hold the masks.
        normal: the type of the normal images.
        mask_suffix: a mask is ``<image stem><mask_suffix>.<any image extension>``.
        masks_required: every anomalous test image needs a mask; else a category may have none at
            all (then only the image metrics are defined), but never some.
    """

    train: str = "train"
    test: str = "test"
    ground_truth: str = "ground_truth"
    normal: str = "good"
    mask_suffix: str = "_mask"
    masks_required: bool = True


MVTEC_AD = Layout()
MPDD = Layout()
BTAD = Layout(normal="ok", mask_suffix="")  # train/ok, test/{ok,ko}, ground_truth/ko/<stem>.png
MVTEC_AD2 = Layout(test="test_public", ground_truth="test_public/ground_truth")  # test_public/{good,bad}
FOLDER = Layout(masks_required=False)


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"no {what} folder: {path}")
    return path


def _no_mask(image: Path, category_dir: Path, mask_dir: Path, layout: Layout) -> str:
    return (f"no ground-truth mask for {image.relative_to(category_dir)} "
            f"(looked for {image.stem}{layout.mask_suffix}.* in {mask_dir})")


def list_samples(root: str | os.PathLike, category: str, split: str = "test", layout: Layout = MVTEC_AD) -> list[Sample]:
    """The samples of one category's split (``train`` or ``test``), in the original's order, with
    masks paired by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    category_dir = root / category
    if not category_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"category folder not found: {category_dir} (categories in {root}: {found})")
    if split == "train":
        folder = _folder(category_dir / layout.train, f"{layout.train}/") / layout.normal
        samples = [Sample(image, layout.normal, None, 0) for image in images_in(_folder(folder, "training images"))]
        if not samples:
            raise DataError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return samples
    test_dir = category_dir / layout.test
    if not test_dir.is_dir():
        raise DataError(f"no {layout.test}/ folder in {category_dir}")
    truth_dir = category_dir / layout.ground_truth
    samples: list[Sample] = []
    without_mask: list[Path] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and p != truth_dir):
        anomaly = type_dir.name
        images = images_in(type_dir)
        if anomaly == layout.normal:
            samples += [Sample(image, anomaly, None, 0) for image in images]
            continue
        mask_dir = truth_dir / anomaly
        masks = {p.stem: p for p in images_in(mask_dir)} if mask_dir.is_dir() else {}
        for image in images:
            mask = masks.pop(f"{image.stem}{layout.mask_suffix}", None)
            if mask is None:
                if layout.masks_required:
                    raise DataError(_no_mask(image, category_dir, mask_dir, layout))
                without_mask.append(image)
            samples.append(Sample(image, anomaly, mask, 1))
        if masks:
            raise DataError(f"{mask_dir}: masks without a test image: {sorted(masks)}")
    if without_mask and len(without_mask) < sum(s.label for s in samples):
        image = without_mask[0]
        also = "; other anomalous images have masks: give all of them masks, or none"
        raise DataError(_no_mask(image, category_dir, truth_dir / image.parent.name, layout) + also)
    if not samples:
        raise DataError(f"no images in {test_dir} (looked for {', '.join(IMAGE_EXTENSIONS)} in its subfolders)")
    return samples
