"""CPU time of one test item: ``MVTecDataset.__getitem__`` against the plain PIL/torchvision chain.

The plain chain is the one the original (and this repository before) ran: ``Image.open(...).convert("RGB")``,
``Resize(resize)``, ``CenterCrop(imagesize)``, ``ToTensor``, ``Normalize``; the mask opened as L, resized
and cropped. Both run in this process, single-threaded, on the same files, alternating per item (so a
neighbour's load hits both alike); every pair of outputs is checked to be bit-identical. Reported: the
median CPU time (``time.process_time``) per item of each, for items with a mask (defect images) and
without (good images), and the ratio of the medians.

Then the test DataLoader as evaluation runs it (``MVTecDataModule``, ``--workers`` processes at the
CPU's worker priority): the workers' CPU time and page faults per image over whole passes, with the
PIL image-buffer cache the workers set up (``PIL_CACHED_BLOCKS``) and without it, alternating. In
this process glibc already reuses the freed buffers, so the in-process comparison above cannot show
what that cache saves in a freshly forked worker; this part does.

    python benchmarks/bench_data.py --root /tmp/bench_eval/data_1024px_60train_150test --category weave
    python benchmarks/bench_data.py --root ... --gray     # the same images as 8-bit grayscale PNGs
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from patchcore_lightning.data import mvtec
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
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the loader passes (0: skip them)")
    parser.add_argument("--loader-repeats", type=int, default=3, help="loader passes with and without the cache")
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
        if args.workers > 0:
            loader_passes(root, args)
    finally:
        if tmp:
            shutil.rmtree(tmp)


def loader_passes(root: Path, args) -> None:
    """Workers' CPU and page faults per image over whole test-loader passes, with and without PIL's block cache."""
    dm = mvtec.MVTecDataModule(str(root), [args.category], args.resize, args.imagesize, num_workers=args.workers)
    dm.setup("test")
    n = len(dm.test_dataset)
    cached = mvtec.PIL_CACHED_BLOCKS
    cpu: dict[int, list[float]] = {cached: [], 0: []}
    faults: dict[int, list[float]] = {cached: [], 0: []}
    try:
        for r in range(args.loader_repeats):
            for blocks in (cached, 0) if r % 2 == 0 else (0, cached):
                mvtec.PIL_CACHED_BLOCKS = blocks  # read by each worker as it starts (forked after this)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                for _ in dm.test_dataloader():
                    pass
                after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers have exited and been reaped
                seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                cpu[blocks].append(seconds / n * 1e3)
                faults[blocks].append((after.ru_minflt - before.ru_minflt) / n)
    finally:
        mvtec.PIL_CACHED_BLOCKS = cached
    for blocks in (cached, 0):
        log.info(
            "test loader, %d workers, PIL blocks cached %d: workers' CPU %6.2f ms per image (passes %s), "
            "page faults %5.0f per image (median of %d passes)",
            args.workers,
            blocks,
            statistics.median(cpu[blocks]),
            ", ".join(f"{c:.1f}" for c in cpu[blocks]),
            statistics.median(faults[blocks]),
            len(cpu[blocks]),
        )


if __name__ == "__main__":
    main()
