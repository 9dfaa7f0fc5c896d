"""CPU time of one test item: ``MVTecDataset.__getitem__`` against the plain PIL/torchvision chain.

The plain chain is the one the original (and this repository before) ran: ``Image.open(...).convert("RGB")``,
``Resize(resize)``, ``CenterCrop(imagesize)``, ``ToTensor``, ``Normalize``; the mask opened as L, resized
and cropped. Both run in this process, single-threaded, on the same files, alternating per item (so a
neighbour's load hits both alike); every pair of outputs is checked to be bit-identical. Reported: the
median CPU time (``time.process_time``) per item of each, for items with a mask (defect images) and
without (good images), and the ratio of the medians.

    python benchmarks/bench_data.py --root /tmp/bench_eval/data_1024px_60train_150test --category weave
    python benchmarks/bench_data.py --root ... --gray     # the same images as 8-bit grayscale PNGs
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from patchcore_lightning.data.mvtec import IMAGENET_MEAN, IMAGENET_STD, MVTecDataset, Sample, list_samples

log = logging.getLogger("bench_data")


def plain_item(sample: Sample, resize: int, imagesize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The item as the plain chain computes it: image (3, S, S) float, mask (S, S) uint8."""
    geometry = [transforms.Resize(resize), transforms.CenterCrop(imagesize)]
    image_transform = transforms.Compose(
        [*geometry, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    with Image.open(sample.image) as img:
        image = img.convert("RGB")
    if sample.mask is None:
        mask = torch.zeros(imagesize, imagesize, dtype=torch.uint8)
    else:
        with Image.open(sample.mask) as img:
            mask_img = img.convert("L")
        mask = torch.from_numpy(np.asarray(transforms.Compose(geometry)(mask_img), dtype=np.uint8).copy())
    return image_transform(image), mask


def gray_copy(root: Path, category: str, out: Path) -> Path:
    """The category with every PNG saved again as 8-bit grayscale (MVTec's grid, screw, zipper are)."""
    for path in (root / category).rglob("*.png"):
        target = out / category / path.relative_to(root / category)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img.convert("L").save(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="MVTec-format root")
    parser.add_argument("--category", default="weave")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--imagesize", type=int, default=224)
    parser.add_argument("--items", type=int, default=20, help="items of each kind (with / without mask)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gray", action="store_true", help="time grayscale copies of the images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp()) if args.gray else None
    try:
        root = gray_copy(args.root, args.category, tmp) if tmp else args.root
        samples = list_samples(root, args.category)
        kinds = {
            "with mask": [i for i, s in enumerate(samples) if s.mask is not None][: args.items],
            "without mask": [i for i, s in enumerate(samples) if s.mask is None][: args.items],
        }
        dataset = MVTecDataset(samples, args.resize, args.imagesize)
        with Image.open(samples[0].image) as img:
            log.info(
                "%s/%s: %dx%d %s, resize %d, crop %d, %d repeats, torch threads %d",
                root,
                args.category,
                *img.size,
                img.mode,
                args.resize,
                args.imagesize,
                args.repeats,
                torch.get_num_threads(),
            )
        for kind, indices in kinds.items():
            times: dict[str, list[float]] = {"plain": [], "ours": []}
            for r in range(args.repeats):
                for k, index in enumerate(indices):
                    order = ("plain", "ours") if (r + k) % 2 == 0 else ("ours", "plain")
                    out = {}
                    for name in order:
                        start = time.process_time()
                        if name == "plain":
                            out[name] = plain_item(samples[index], args.resize, args.imagesize)
                        else:
                            out[name] = dataset[index][:2]
                        times[name].append(time.process_time() - start)
                    for a, b in zip(out["plain"], out["ours"]):
                        assert torch.equal(a, b), f"outputs differ for {samples[index].image}"
            plain, ours = (statistics.median(times[n]) * 1e3 for n in ("plain", "ours"))
            log.info(
                "%-13s %3d items x %d: plain %6.2f ms, ours %6.2f ms (median CPU per item), ratio %.2fx",
                kind,
                len(indices),
                args.repeats,
                plain,
                ours,
                plain / ours,
            )
    finally:
        if tmp:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
