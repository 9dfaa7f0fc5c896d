"""CPU time of one test item: ``MVTecDataset.__getitem__`` against the plain PIL/torchvision chain.

The plain chain is the one the original (and this repository before) ran: ``Image.open(...).convert("RGB")``,
``Resize(resize)``, ``CenterCrop(imagesize)``, ``ToTensor``, ``Normalize``; the mask opened as L, resized
and cropped. Three variants run in this process, single-threaded, on the same files, in sweeps over the
items whose order alternates from repeat to repeat: the plain chain with PIL's default memory settings
(as the original's workers run it), ours with PIL keeping freed image buffers (as our DataLoader
workers run it, ``PIL_CACHED_BLOCKS``), and ours without that cache. Every item's outputs are
checked to be bit-identical across the three. Reported: the median CPU time (``time.process_time``)
per item of each, for items with a mask (defect images) and without (good images), and plain / ours.

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

from patchcore_lightning.data.mvtec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIL_CACHED_BLOCKS,
    MVTecDataset,
    Sample,
    list_samples,
)

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
        # name -> (item function, PIL's cached image blocks while it runs): the plain chain as the
        # original's workers run it (PIL's default), ours as our workers run it, and ours without
        # the block cache (what the cache saves).
        variants = {
            "plain": (lambda i: plain_item(samples[i], args.resize, args.imagesize), 0),
            "ours": (lambda i: dataset[i][:2], PIL_CACHED_BLOCKS),
            "ours, no block cache": (lambda i: dataset[i][:2], 0),
        }
        for kind, indices in kinds.items():
            times: dict[str, list[float]] = {name: [] for name in variants}
            for r in range(args.repeats):
                # whole sweeps per variant (switching the cache per item would empty it), alternating order
                outputs = {}
                for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
                    item, blocks = variants[name]
                    Image.core.set_blocks_max(blocks)  # 0 also frees what is cached
                    outputs[name] = []
                    for index in indices:
                        start = time.process_time()
                        outputs[name].append(item(index))
                        times[name].append(time.process_time() - start)
                for index, *outs in zip(indices, *outputs.values()):
                    for out in outs[1:]:
                        for a, b in zip(outs[0], out):
                            assert torch.equal(a, b), f"outputs differ for {samples[index].image}"
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            log.info(
                "%-13s %3d items x %d: %s (median CPU per item); plain / ours %.2fx",
                kind,
                len(indices),
                args.repeats,
                ", ".join(f"{name} {ms:6.2f} ms" for name, ms in medians.items()),
                medians["plain"] / medians["ours"],
            )
    finally:
        if tmp:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
