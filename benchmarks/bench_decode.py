"""Decoding by libspng (``data/png.py``) against PIL alone: a data item's time and the DataLoader's images/s;
or (``--compare loaders``) a DataLoader's whole batch per worker against ``ItemwiseLoader``'s items across workers.

    python benchmarks/bench_decode.py [--workers N] [--passes 5]
    python benchmarks/bench_decode.py --compare loaders --workers 2 --batch-size 32 [--passes 5]

On a GPU the test loop runs no faster than its DataLoader workers decode (``bench_gpu.py``'s decode
floor), and decoding is most of an item's work; this measures what libspng is worth there, on any
machine. Data: ``bench_eval.py``'s (a synthetic MVTec-format category, 1024² PNGs as MVTec AD's,
150 test images, 70 with masks), read by the test data set at 224² (Resize 256, CenterCrop 224).
Two figures, each for libspng and for PIL alone (``plain_png`` answering no), alternated pass by
pass; medians:

- one item (image and mask read, resized, cropped, normalised) in this process: milliseconds;
- the test DataLoader with the GPU's defaults (batches of 32; the cores less one as workers, unless
  ``--workers``): images/s, the decode floor of a GPU with this machine's cores.

``--compare loaders`` times one pass of the 150 test images (libspng) through the plain DataLoader
(each worker decodes whole batches) and through ``ItemwiseLoader`` (every worker decodes items of
every batch; what the data module serves), workers started anew each pass, alternated; it checks
that both give the same batches. With 16 workers and 5 batches, 11 workers of the plain DataLoader
never work; 2 workers, 32-image batches and 150 images scale that down to a 2-core machine
(3 batches for one worker, 2 for the other).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patchcore_lightning.data import images  # noqa: E402
from patchcore_lightning.data.datamodule import ItemwiseLoader, ShardBatches, loader_settings  # noqa: E402
from patchcore_lightning.data.mvtec import MVTecDataset, list_samples  # noqa: E402
from patchcore_lightning.data.synthetic import make_synthetic_mvtec  # noqa: E402

DECODERS = {"libspng": images.plain_png, "PIL alone": lambda img, mode: False}


def item_ms(dataset: MVTecDataset) -> float:
    """Median milliseconds of one item, read in this process."""
    times = []
    for i in range(len(dataset)):
        start = time.perf_counter()
        dataset[i]
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def loader_rate(dataset: MVTecDataset, batch_size: int, workers: int, loader_class=ItemwiseLoader,
                checksums: list | None = None) -> float:
    """Images/s of one pass of the test loader (workers started anew, as for every category); the
    batches' pixel sums appended to ``checksums`` when given."""
    loader = loader_class(dataset, batch_sampler=ShardBatches(len(dataset), batch_size), num_workers=workers)
    start = time.perf_counter()
    for batch in loader:
        if checksums is not None:
            checksums.append((batch[0].double().sum().item(), batch[3].tolist()))
    return len(dataset) / (time.perf_counter() - start)


def compare_loaders(dataset: MVTecDataset, batch_size: int, workers: int, passes: int) -> None:
    """The plain DataLoader against ItemwiseLoader: images/s, alternated pass by pass; same batches."""
    loaders = {"DataLoader (a batch per worker)": torch.utils.data.DataLoader,
               "ItemwiseLoader (items across workers)": ItemwiseLoader}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    sums: dict[str, list] = {name: [] for name in loaders}
    for p in range(passes):
        for name, loader_class in loaders.items():
            rates[name].append(loader_rate(dataset, batch_size, workers, loader_class, sums[name] if p == 0 else None))
    plain, ours = (sums[name] for name in loaders)
    assert plain == ours, "the loaders gave different batches"
    print(f"{len(dataset)} test images of 1024², 224² items, batch {batch_size}, {workers} workers, "
          f"medians of {passes} alternated passes; the same batches from both")
    assert len(sums[next(iter(loaders))]) == len(ShardBatches(len(dataset), batch_size))
    print("| loader | images/s |\n| --- | --- |")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} |")
    first, second = (statistics.median(rates[name]) for name in loaders)
    print(f"ItemwiseLoader / DataLoader: {second / first:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_eval", help="generated data (shared with bench_eval.py)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the GPU default for this machine)")
    parser.add_argument("--passes", type=int, default=5, help="passes of each figure and decoder")
    parser.add_argument("--compare", choices=["decoders", "loaders"], default="decoders")
    parser.add_argument("--batch-size", type=int, help="images a batch (default: the GPU default, 32)")
    parser.add_argument("--images", type=int, help="the first N test images only (default: all 150)")
    args = parser.parse_args()

    root = make_synthetic_mvtec(Path(args.workdir) / "data_1024px_60train_150test", ("weave",), 1024, 60, 30, 40)
    dataset = MVTecDataset(list_samples(root, "weave")[: args.images], 256, 224)
    batch_size, workers = loader_settings(args.batch_size, args.workers, "cuda")
    if args.compare == "loaders":
        compare_loaders(dataset, batch_size, workers, args.passes)
        return
    figures: dict[str, dict[str, list[float]]] = {name: {"item": [], "loader": []} for name in DECODERS}
    for _ in range(args.passes):
        for name, plain_png in DECODERS.items():
            images.plain_png = plain_png  # forked workers inherit it
            figures[name]["item"].append(item_ms(dataset))
            figures[name]["loader"].append(loader_rate(dataset, batch_size, workers, torch.utils.data.DataLoader))
    images.plain_png = DECODERS["libspng"]

    print(f"{len(dataset)} test images of 1024², 224² items, batch {batch_size}, {workers} workers, "
          f"medians of {args.passes} passes")
    print("| decoder | item ms | DataLoader images/s |\n| --- | --- | --- |")
    for name, f in figures.items():
        print(f"| {name} | {statistics.median(f['item']):.1f} | {statistics.median(f['loader']):.1f} |")
    spng, pil = (figures[n] for n in DECODERS)
    print(f"libspng / PIL: item time {statistics.median(spng['item']) / statistics.median(pil['item']):.2f}, "
          f"DataLoader rate {statistics.median(spng['loader']) / statistics.median(pil['loader']):.2f}")


if __name__ == "__main__":
    main()
